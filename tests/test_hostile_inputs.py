"""Hostile and corrupt inputs as a user meets them on the command line (issue #14 B).

Every case: exit 1 or 2, one line on stderr that starts with ``error:``, no traceback (Python
or Rust), no output file and no temporary file left beside it, and the input untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qconvert.container import ContainerWriter, TensorSpec, open_container
from tests.conftest import STORIES, make_hf_folder, need_shared, write_safetensors


def qconvert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qconvert", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _files(paths) -> dict[str, str]:
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def refused(args: list, pattern: str, inputs: list, output: Path | None = None) -> str:
    """Run the CLI on a bad input and check the refusal is clean; returns the error line."""
    before = _files(inputs)
    siblings = set(output.parent.iterdir()) if output is not None and output.parent.exists() else set()
    proc = qconvert(*args)
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for marker in ("Traceback", "panicked", "internal error", "stack backtrace"):
        assert marker not in proc.stderr + proc.stdout
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert _files(inputs) == before, "the input was modified"
    if output is not None:
        assert not output.exists()
        assert set(output.parent.iterdir()) == siblings, "a temporary file was left behind"
    return lines[0]


def rewrite_container(src: Path, dst: Path, edit) -> Path:
    """A copy of a container with ``edit(metadata)`` applied, written by the real writer
    (valid checksums: hostile content, not corruption)."""
    with open_container(src) as c:
        meta = dict(c.metadata)
        edit(meta)
        specs = [TensorSpec(n, i.shape, i.block_type.name, i.extra) for n, i in c.tensors.items()]
        with ContainerWriter(dst, meta, specs) as w:
            for n in c.tensors:
                w.write(n, c.raw(n, verify=False))
    return dst


@pytest.fixture(scope="module")
def tiny_container(tmp_path_factory) -> Path:
    import qconvert

    d = tmp_path_factory.mktemp("hostile")
    out = d / "m.q8"
    qconvert.quantize(make_hf_folder(d / "hf"), out, method="rtn", bits=8)
    return out


# -- B.1 the fixed header -----------------------------------------------------------------------


def test_a_flipped_tensor_count_fails_inspect_verify(tiny_container, tmp_path):
    bad = tmp_path / "bad.q"
    data = bytearray(tiny_container.read_bytes())
    data[24] ^= 0x16  # n_tensors 20 -> 2: in format 1.0, 18 tensors vanished and --verify said OK
    bad.write_bytes(bytes(data))
    refused(["inspect", bad, "--verify"], "fixed header \\(bytes 0-47\\) fails its checksum", [bad])


# -- B.2 tokenizers panics ----------------------------------------------------------------------


def _panicking_tokenizer_json() -> str:
    doc = json.loads((need_shared(STORIES) / "tokenizer.json").read_text())
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<zz>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {},
    }
    return json.dumps(doc)


def test_tokenizer_whose_post_processor_names_an_unknown_token_is_refused_at_quantize(tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    (folder / "tokenizer.json").write_text(_panicking_tokenizer_json())
    out = tmp_path / "out" / "m.q"
    out.parent.mkdir()
    refused(["quantize", folder, "-o", out], "post-processor adds the special token '<zz>'", [folder], out)


def test_container_with_a_panicking_tokenizer_is_refused_at_run(tiny_container, tmp_path):
    bad = rewrite_container(tiny_container, tmp_path / "bad.q",
                            lambda m: m.__setitem__("tokenizer.json", _panicking_tokenizer_json()))
    refused(["run", bad, "--prompt", "Once", "-n", "2"], "special token '<zz>'", [bad])


def test_a_tokenizers_panic_becomes_one_sentence_without_a_rust_backtrace(tmp_path):
    """The guard itself (the pre-check switched off): the PanicException is caught and the
    panic message, printed by Rust on file descriptor 2, is silenced."""
    (tmp_path / "tok.json").write_text(_panicking_tokenizer_json())
    script = (
        "import sys\n"
        "import qconvert.runtime.tokenizer as t\n"
        "from qconvert.errors import QConvertError\n"
        "t.check_post_processor = lambda text: None\n"
        f"text = open({str(tmp_path / 'tok.json')!r}).read()\n"
        "try:\n"
        "    t.Tokenizer.from_metadata({'tokenizer.json': text})\n"
        "except QConvertError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "RUST_BACKTRACE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused: the tokenizer's post-processor cannot add its special tokens"), proc.stdout
    assert "panicked" not in proc.stderr and "backtrace" not in proc.stderr


# -- B.3 memory amplification -------------------------------------------------------------------


def test_safetensors_header_that_would_take_gigabytes_is_refused(tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    header = b'{"x":[' + b"1," * 7_000_000 + b'1]}'
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    out = tmp_path / "m.q"
    refused(["quantize", folder, "-o", out], "header is not a JSON object \\(is too large to load", [folder], out)


def test_gguf_metadata_arrays_beyond_the_element_budget_are_refused(tmp_path):
    key = b"general.big"
    n = 4_100_000
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    data += struct.pack("<iiQ", 9, 0, n) + bytes(n)  # an ARRAY of n UINT8
    path = tmp_path / "big.gguf"
    path.write_bytes(data)
    refused(["quantize", path, "-o", tmp_path / "m.q"], "more than 4,000,000 elements", [path], tmp_path / "m.q")


def test_inspect_memory_stays_bounded_on_amplifying_metadata(tiny_container, tmp_path):
    """40 MB of metadata that json.loads would turn into ~1.7 GB of objects: refused before
    parsing; the process's peak RSS stays a small multiple of the file plus the interpreter."""
    from tests.test_container import _rewrite_entry, _set_kv

    bad = tmp_path / "bad.q"
    bad.write_bytes(_rewrite_entry(tiny_container.read_bytes(), _set_kv("x.json", 7, b"[" + b"-100," * 10_000_000 + b"1]")))
    script = (
        "import sys\n"
        "from qconvert.cli import main\n"
        "try:\n"
        f"    main(['inspect', {str(bad)!r}])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print(code, next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    code, rss_mib = proc.stdout.split()
    assert code == "1" and "too large to load" in proc.stderr, proc.stderr
    file_mib = bad.stat().st_size / 2**20
    assert int(rss_mib) < 400 + 3 * file_mib, (rss_mib, file_mib)


# -- B.4 hostile Hugging Face folders -----------------------------------------------------------


def _with_config(tmp_path: Path, text: str) -> Path:
    folder = make_hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("deep", "config.json in .* nests more than 64 levels deep"),
        ("inf", "config.json in .* holds the number Infinity, which JSON does not allow"),
        ("dup", "config.json in .* has the key 'model_type' twice"),
    ],
)
def test_hostile_config_json(tmp_path, text, pattern):
    from tests.conftest import tiny_llama_config

    cfg = json.dumps(tiny_llama_config())
    text = {"deep": "[" * 100_000 + "]" * 100_000,
            "inf": cfg.replace('"rope_theta": 10000.0', '"rope_theta": Infinity'),
            "dup": cfg[:-1] + ', "model_type": "llama"}'}[text]
    folder = _with_config(tmp_path, text)
    refused(["quantize", folder, "-o", tmp_path / "m.q"], pattern, [folder], tmp_path / "m.q")


def test_tokenizer_json_that_is_not_utf8(tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    (folder / "tokenizer.json").write_bytes(b'{"model": "\xff\xfe"}')
    refused(["quantize", folder, "-o", tmp_path / "m.q"], "tokenizer.json in .* is not UTF-8 text", [folder], tmp_path / "m.q")


def _safetensors_with_entry(folder: Path, entry: dict, extra: bytes = b"") -> None:
    header = json.dumps({"model.embed_tokens.weight": entry}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + extra)


@pytest.mark.parametrize(
    "entry,pattern",
    [
        ({"dtype": None, "shape": [2], "data_offsets": [0, 8]}, "bad header entry for 'model.embed_tokens.weight'"),
        ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "bad header entry"),
        ({"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}, "needs 73786976294838206464 bytes, its offsets give 8"),
        ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 8]}, "needs 73786976294838206464 bytes"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad header entry"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "needs bytes 8..0"),
    ],
    ids=["dtype-null", "dtype-list", "shape-2^64", "shape-wraps-int64", "negative-dim", "offsets-reversed"],
)
def test_hostile_safetensors_entries(tmp_path, entry, pattern):
    folder = make_hf_folder(tmp_path / "hf")
    _safetensors_with_entry(folder, entry, bytes(8))
    refused(["quantize", folder, "-o", tmp_path / "m.q"], pattern, [folder], tmp_path / "m.q")


# -- B.5 ONNX initializers that do not match their dims -----------------------------------------


def _onnx(tmp_path: Path, edit) -> Path:
    onnx = pytest.importorskip("onnx")
    from tests.test_onnx import tiny_model

    model = tiny_model()
    edit(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_onnx_initializer_with_less_data_than_its_dims(tmp_path):
    def edit(m):
        t = _init(m, "g1_w")
        t.raw_data = t.raw_data[:-4]

    path = _onnx(tmp_path, edit)
    refused(["quantize", path, "-o", tmp_path / "m.q"], "ONNX tensor 'g1_w' of shape \\[40, 64\\] needs 10240 bytes of data but holds 10236",
            [path], tmp_path / "m.q")


def test_onnx_initializer_with_a_negative_dim(tmp_path):
    def edit(m):
        t = _init(m, "g2_w")
        t.dims[0] = -40

    path = _onnx(tmp_path, edit)
    refused(["quantize", path, "-o", tmp_path / "m.q"], "ONNX tensor 'g2_w' has a negative dimension", [path], tmp_path / "m.q")


# -- B.7 / B.8 containers with valid checksums but hostile content ------------------------------


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("bytes-config", "metadata 'model.config' is BYTES"),
        ("deep-recipe", "metadata 'recipe' nests more than 64 levels deep"),
        ("params-list", "params of tensor 'model.layers.0.mlp.up_proj.weight' are not a JSON object"),
        ("garbage-perm", "input_perm that is not a permutation"),
        ("wrapping-dims", "has 8704 bytes, its shape and type need 1254378597012249509888"),
    ],
)
def test_hostile_container_content_is_refused_by_inspect_json(tiny_container, tmp_path, case, pattern):
    from tests.test_container import _rewrite_entry, _set_kv, _set_params

    def dims(kvs, tensors):
        next(t for t in tensors if t["name"] == "model.layers.0.mlp.up_proj.weight")["dims"] = [2**32, 2**32, 64]

    edit = {
        "bytes-config": _set_kv("model.config", 6, b"\x00"),
        "deep-recipe": _set_kv("recipe", 7, b"[" * 10_000 + b"]" * 10_000),
        "params-list": _set_params("model.layers.0.mlp.up_proj.weight", b"[1]"),
        "garbage-perm": _set_params("model.layers.0.mlp.up_proj.weight", b'{"input_perm": {"a": 1}}'),
        "wrapping-dims": dims,
    }[case]
    bad = tmp_path / "bad.q"
    bad.write_bytes(_rewrite_entry(tiny_container.read_bytes(), edit))
    refused(["inspect", bad, "--json", "--verify"], pattern, [bad])


def test_hostile_source_provenance_still_inspects(tiny_container, tmp_path):
    """source is informative: garbage inside it is shown as far as it goes, never a crash."""
    bad = rewrite_container(tiny_container, tmp_path / "bad.q",
                            lambda m: m.__setitem__("source", {"files": [1, {"x": 2}], "tensor_bytes": "many"}))
    proc = qconvert("inspect", bad)
    assert proc.returncode == 0, proc.stderr
    proc = qconvert("inspect", bad, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["source"]["files"] == [{"name": "?", "bytes": None}] and info["totals"]["compression_ratio"] is None


# -- B.9 aliased data and duplicate keys --------------------------------------------------------


def test_safetensors_tensors_sharing_bytes_are_refused(tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    a = np.ones((4, 8), np.float32).tobytes()
    write_safetensors(folder / "model.safetensors", {"a.weight": ("F32", (4, 8), a), "b.weight": ("F32", (4, 8), a)})
    data = bytearray((folder / "model.safetensors").read_bytes())
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    header["b.weight"]["data_offsets"] = [64, 192]  # overlaps a.weight's 0..128
    text = json.dumps(header).encode().ljust(n)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + text + bytes(data[8 + n :]))
    refused(["quantize", folder, "-o", tmp_path / "m.q"], "tensors 'a.weight' and 'b.weight' share bytes", [folder], tmp_path / "m.q")


def test_safetensors_header_with_a_repeated_key_is_refused(tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    header = f'{{"w": {entry}, "w": {entry}}}'.encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    refused(["quantize", folder, "-o", tmp_path / "m.q"], "header is not a JSON object \\(has the key 'w' twice\\)",
            [folder], tmp_path / "m.q")


def _tiny_gguf(tmp_path: Path) -> Path:
    pytest.importorskip("gguf")
    from tests.test_source_gguf import write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    return path


def _gguf_offset_field(data: bytes, name: str) -> int:
    at = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims + 4


def test_gguf_tensors_sharing_bytes_are_refused(tmp_path):
    path = _tiny_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    src = _gguf_offset_field(data, "blk.1.ffn_up.weight")
    struct.pack_into("<Q", data, _gguf_offset_field(data, "blk.0.ffn_up.weight"), struct.unpack_from("<Q", data, src)[0])
    path.write_bytes(bytes(data))
    refused(["quantize", path, "-o", tmp_path / "m.q"], "tensors 'blk.0.ffn_up.weight' and 'blk.1.ffn_up.weight' share bytes|"
            "tensors 'blk.1.ffn_up.weight' and 'blk.0.ffn_up.weight' share bytes", [path], tmp_path / "m.q")


def test_gguf_nan_metadata_float_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(b"general.t_f32") + len("general.t_f32")
    assert struct.unpack_from("<i", data, at)[0] == 6  # FLOAT32
    struct.pack_into("<f", data, at + 4, math.nan)
    path.write_bytes(bytes(data))
    refused(["quantize", path, "-o", tmp_path / "m.q"], "value of 'general.t_f32' is nan, which qconvert cannot store",
            [path], tmp_path / "m.q")


# -- B.10 GGUF vocabulary vs merges; llama2.c files ---------------------------------------------


def test_gguf_whose_merges_name_tokens_its_vocabulary_lacks_is_refused_at_import(tmp_path):
    """tests/test_source_gguf.py's tiny llama merges "t o" and "to k", tokens its vocabulary
    (<unk>, <s>, </s>, tok0 ...) does not have: it used to convert, then fail at run."""
    path = _tiny_gguf(tmp_path)
    # it also embeds a tokenizer.huggingface.json that is no tokenizer ({"version": "1.0"}): refused first
    refused(["quantize", path, "-o", tmp_path / "m.q"], "tokenizer.json cannot be loaded: Model missing", [path], tmp_path / "m.q")
    data = path.read_bytes().replace(b"tokenizer.huggingface.json", b"tokenizer.huggingface.jsoX")
    path.write_bytes(data)
    refused(["quantize", path, "-o", tmp_path / "m.q"], "vocabulary and merges disagree: .*Token `t` out of vocabulary",
            [path], tmp_path / "m.q")


def test_llama2c_checkpoint_and_tokenizer_are_named_as_such():
    original = need_shared(STORIES / "original")
    line = refused(["quantize", original / "stories260K.bin", "-o", "/nonexistent/x.q"],
                   "stories260K.bin is a llama2.c checkpoint \\(dim 64, 5 layers, 8 heads, 4 kv heads, vocabulary 512", [original])
    assert "pickle" not in line
    refused(["quantize", original / "tok512.bin", "-o", "/nonexistent/x.q"], "tok512.bin is a llama2.c tokenizer \\(512 tokens\\)",
            [original])
    refused(["quantize", original, "-o", "/nonexistent/x.q"], "original holds llama2.c files", [original])


# -- B.11 / B.12 ONNX containers ----------------------------------------------------------------


def test_export_refuses_a_stored_graph_with_a_foreign_external_data_location(tmp_path):
    onnx = pytest.importorskip("onnx")
    import qconvert

    src = _onnx(tmp_path, lambda m: None)
    good = tmp_path / "good.q"
    qconvert.quantize(src, good)

    def edit(meta):
        model = onnx.load_from_string(meta["onnx.graph"])
        t = model.graph.initializer.add()
        t.name, t.data_type, t.data_location = "leak", onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
        t.dims.append(16)
        e = t.external_data.add()
        e.key, e.value = "location", "/etc/passwd"
        meta["onnx.graph"] = model.SerializeToString()

    bad = rewrite_container(good, tmp_path / "bad.q", edit)
    out = tmp_path / "exported" / "m.onnx"
    out.parent.mkdir()
    refused(["export", bad, "--to", "onnx", "-o", out], "refers to the external data '/etc/passwd' for tensor 'leak'", [bad], out)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    refused(["run", bad, "--input", tmp_path / "x.npy"], "external data '/etc/passwd'", [bad])


def test_negative_dim_value_is_a_dynamic_dimension(tmp_path):
    """PaddlePaddle's exporter marks dynamic dims with dim_value -1: calibration, run and
    export take any size there."""
    pytest.importorskip("onnx")
    from qconvert.onnx.convert import quantize_onnx
    from qconvert.onnx.export import export_qdq
    from qconvert.onnx.runner import run_container

    def edit(m):
        for vi in (m.graph.input[0], m.graph.output[0]):
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_value = -1

    src = _onnx(tmp_path, edit)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "0.npy", np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    quantize_onnx(src, tmp_path / "m.q", calib=tmp_path / "calib")
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    outputs, _ = run_container(tmp_path / "m.q", {"x": x})
    assert outputs["y"].shape == (4, 10)
    export_qdq(tmp_path / "m.q", tmp_path / "e.onnx")
    from qconvert.onnx.engine import Session
    import onnx

    exported = Session(onnx.load(str(tmp_path / "e.onnx"))).run({"x": x})
    np.testing.assert_allclose(exported["y"], outputs["y"], rtol=1e-4, atol=1e-4)
