"""The command line as a user meets it: exit codes, one-line errors, no tracebacks, --json."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOLLM_GGUF, make_hf_folder, need_shared


def qconvert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qconvert", *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def container(tmp_path) -> Path:
    folder = make_hf_folder(tmp_path / "tiny")
    out = tmp_path / "m.q8"
    proc = qconvert("quantize", folder, "--bits", "8", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    return out


def test_quantize_then_inspect_json(container):
    proc = qconvert("inspect", container, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format_version"] == "1.0"
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["model.layers.1.mlp.down_proj.weight"] == {
        "name": "model.layers.1.mlp.down_proj.weight", "shape": [64, 128], "type": "Q8_0",
        "bytes": 64 * 4 * 34, "bits_per_weight": 8.5,
    }
    assert tensors["model.norm.weight"]["type"] == "F32"
    assert info["totals"]["types"] == {"F32": 5, "Q8_0": 15}
    assert info["totals"]["source_tensor_bytes"] == 4 * info["totals"]["parameters"]


def test_inspect_table_and_verify(container):
    proc = qconvert("inspect", container, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in proc.stdout
    assert "all tensors OK" in proc.stdout
    assert "bits per weight" in proc.stdout


def test_quantize_json_summary(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    proc = qconvert("quantize", folder, "--bits", "4", "--asym", "-o", tmp_path / "m.q4", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}


def test_flipped_byte_fails_verify(container):
    data = bytearray(container.read_bytes())
    data[-200] ^= 0xFF
    container.write_bytes(bytes(data))
    proc = qconvert("inspect", container, "--verify")
    assert proc.returncode == 1
    assert "fail their checksum" in proc.stderr


def test_truncated_container(container):
    container.write_bytes(container.read_bytes()[:1000])
    assert_one_line_error(qconvert("inspect", container), "truncated container")


def test_header_claiming_1e15_tensors(container):
    data = bytearray(container.read_bytes())
    struct.pack_into("<Q", data, 24, 10**15)
    container.write_bytes(bytes(data))
    assert_one_line_error(qconvert("inspect", container), "claims 1000000000000000 tensors")


def test_truncated_safetensors(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    assert_one_line_error(qconvert("quantize", folder, "-o", tmp_path / "m.q"), "truncated or corrupt safetensors file model.safetensors")
    assert not (tmp_path / "m.q").exists()


def test_pickle_checkpoint(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    assert_one_line_error(qconvert("quantize", folder, "-o", tmp_path / "m.q"), "never unpickles")
    assert_one_line_error(qconvert("quantize", folder / "pytorch_model.bin", "-o", tmp_path / "m.q"), "pickle checkpoint")


def test_missing_config_json(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    (folder / "config.json").unlink()
    assert_one_line_error(qconvert("quantize", folder, "-o", tmp_path / "m.q"), "no config.json")


def test_gguf_with_bad_type_id(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    pos = data.index(name) + len(name) + 4 + 2 * 8  # n_dims u32, two u64 dims
    struct.pack_into("<i", data, pos, 250)
    path.write_bytes(bytes(data))
    assert_one_line_error(qconvert("quantize", path, "-o", tmp_path / "m.q"), "250")


def test_wrong_option_is_one_line(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    assert_one_line_error(qconvert("quantize", folder, "--bits", "6", "-o", tmp_path / "m.q"), "supports --bits 2, 3, 4, 8, not 6")


def test_missing_file(tmp_path):
    assert_one_line_error(qconvert("inspect", tmp_path / "nope.q"), "no such file")


def test_debug_shows_the_traceback(tmp_path):
    proc = qconvert("inspect", tmp_path / "nope.q", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_usage_error_exit_code(tmp_path):
    proc = qconvert("quantize")
    assert proc.returncode == 2


def test_version_prints_the_package_version():
    import qconvert as package

    proc = qconvert("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"qconvert {package.__version__}\n"


def test_demo_model_is_packaged_and_recorded_as_demo(tmp_path):
    out = tmp_path / "s.q8"
    proc = qconvert("quantize", "demo:stories260K", "--method", "rtn", "--bits", "8", "-o", out)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qconvert("inspect", out, "--json").stdout)
    assert info["source"]["id"] == "demo:stories260K" and info["source"]["kind"] == "hf"
    files = {f["name"]: f for f in info["source"]["files"]}
    # the sha256 of shared/models/stories260K/model.safetensors in shared/models/PROVENANCE.md
    assert files["model.safetensors"]["sha256"] == "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
    assert info["totals"]["parameters"] == 260_032 and info["has_tokenizer"]


def test_unknown_demo_names_the_available_ones(tmp_path):
    assert_one_line_error(qconvert("quantize", "demo:stories15M", "-o", tmp_path / "s.q8"),
                          r"no built-in demo model 'stories15M'; available: demo:stories260K$")


def test_demo_refuses_a_revision(tmp_path):
    assert_one_line_error(qconvert("quantize", "demo:stories260K", "--revision", "main", "-o", tmp_path / "s.q8"),
                          "--revision is for hub ids")


@pytest.mark.shared
def test_smollm2_gguf_source_rtn8(tmp_path):
    src = need_shared(SMOLLM_GGUF)
    out = tmp_path / "smol.q8"
    proc = qconvert("quantize", src, "--method", "rtn", "--bits", "8", "--allow-requantize", "-o", out)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(qconvert("inspect", out, "--json").stdout)
    assert info["source"]["kind"] == "gguf" and info["source"]["quantized"] is True
    assert info["source"]["source_types"] == {"F32": 61, "Q4_1": 211} or "Q4_1" in info["source"]["source_types"]
    tensors = {t["name"]: t for t in info["tensors"]}
    assert len(tensors) == 272
    assert tensors["model.embed_tokens.weight"]["shape"] == [49152, 576]
    assert tensors["model.layers.29.mlp.down_proj.weight"] == {
        "name": "model.layers.29.mlp.down_proj.weight", "shape": [576, 1536], "type": "Q8_0",
        "bytes": 576 * 48 * 34, "bits_per_weight": 8.5,
    }
    assert tensors["model.layers.0.self_attn.k_proj.weight"]["shape"] == [192, 576]
    assert info["totals"]["parameters"] == 134_515_008
