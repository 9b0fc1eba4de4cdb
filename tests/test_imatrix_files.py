"""llama.cpp's importance-matrix files: bring your own (legacy imatrix.dat, GGUF imatrix) and
take ours to llama-quantize.

The .dat files here are built byte by byte from the layout in llama.cpp's tools/imatrix
(independently of qconvert's writer); the GGUF ones with gguf-py's writer and reader."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.imatrix import load_imatrix, save_imatrix
from qconvert.imatrix_files import DAT, GGUF, write_llama_imatrix
from tests.conftest import SHARED, STORIES, make_hf_folder, need_shared
from tests.test_cli import assert_one_line_error, qconvert as cli

CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


def dat_bytes(entries: list[tuple[str, int, np.ndarray]], trailer: tuple[int, str] | None = (10, "calib.txt")) -> bytes:
    """llama-imatrix's legacy file: (name, ncall, stored values) per entry, then chunks and dataset."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return out


def test_reads_a_legacy_dat_like_llama_quantize(tmp_path):
    down = np.array([10.0, 20.0, 0.5, 4.0], np.float32)  # stored: mean x^2 times ncall
    q = np.linspace(1, 8, 8).astype(np.float32)
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes([("blk.1.ffn_down.weight", 10, down), ("blk.0.attn_q.weight", 4, q)]))
    importance, info = load_imatrix(path)
    assert sorted(importance) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(importance["model.layers.1.mlp.down_proj.weight"], down / 10)
    np.testing.assert_array_equal(importance["model.layers.0.self_attn.q_proj.weight"], q / 4)
    assert info["format"] == DAT and info["chunks"] == 10 and info["datasets"] == ["calib.txt"]
    # files from before the trailer existed read the same
    path.write_bytes(dat_bytes([("blk.1.ffn_down.weight", 10, down)], trailer=None))
    np.testing.assert_array_equal(load_imatrix(path)[0]["model.layers.1.mlp.down_proj.weight"], down / 10)


def test_reads_a_gguf_imatrix_written_by_gguf_py(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(path), arch=None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.array([[3.0, 6.0, 1536.0, 0.0]], np.float32)
    w.add_tensor("blk.0.ffn_up.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_up.weight.counts", np.array([[1536.0]], np.float32))
    w.add_tensor("blk.0.ffn_up.weight.in_sum", np.zeros((1, 4), np.float32))
    w.add_tensor("blk.0.ffn_gate.weight.in_sum2", np.ones((1, 4), np.float32))
    w.add_tensor("blk.0.ffn_gate.weight.counts", np.zeros((1, 1), np.float32))  # never saw a token
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    importance, info = load_imatrix(path)
    np.testing.assert_array_equal(importance["model.layers.0.mlp.up_proj.weight"], sums[0] / 1536)
    np.testing.assert_array_equal(importance["model.layers.0.mlp.gate_proj.weight"], np.ones(4))  # as llama-quantize
    assert info["format"] == GGUF and info["chunks"] == 3 and info["ctx"] == 512 and info["datasets"] == ["wiki.train.raw"]


def _importance() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]
    imp = {n: rng.gamma(0.5, 2.0, 64).astype(np.float32) for n in names}
    imp.update({f"model.layers.{i}.mlp.down_proj.weight": rng.gamma(0.5, 2.0, 128).astype(np.float32) for i in range(2)})
    return imp


@pytest.mark.parametrize("fmt,suffix", [(DAT, ".dat"), (GGUF, ".gguf")])
def test_write_then_read_gives_the_same_importance(tmp_path, fmt, suffix):
    imp = _importance()
    info = {"ctx": 512, "chunks": 4, "tokens": 2048, "calibration_file": "calib.txt"}
    path = write_llama_imatrix(tmp_path / f"i{suffix}", imp, info, fmt)
    back, binfo = load_imatrix(path)
    assert back.keys() == imp.keys()
    for name in imp:
        np.testing.assert_allclose(back[name], imp[name], rtol=1e-6)
    assert binfo["chunks"] == 4 and binfo["datasets"] == ["calib.txt"]


def test_our_gguf_imatrix_has_llama_cpp_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    imp = _importance()
    write_llama_imatrix(tmp_path / "i.gguf", imp, {"ctx": 256, "chunks": 2, "tokens": 512, "calibration_file": "c.txt"}, GGUF)
    r = gguf.GGUFReader(tmp_path / "i.gguf")
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(r.fields["imatrix.chunk_count"].parts[-1][0]) == 2
    assert int(r.fields["imatrix.chunk_size"].parts[-1][0]) == 256
    tensors = {t.name: t for t in r.tensors}
    q = tensors["blk.0.attn_q.weight.in_sum2"]
    assert [int(d) for d in q.shape] == [64, 1]  # ggml order: ne0 = columns, ne1 = matrices
    np.testing.assert_allclose(np.asarray(q.data).reshape(-1) / 512, imp["model.layers.0.self_attn.q_proj.weight"], rtol=1e-6)
    assert float(np.asarray(tensors["blk.0.attn_q.weight.counts"].data).reshape(-1)[0]) == 512
    assert len(tensors) == 2 * len(imp)


def test_our_dat_has_llama_cpp_layout(tmp_path):
    imp = {"model.layers.0.mlp.down_proj.weight": np.array([1.0, 2.0, 0.25], np.float32)}
    write_llama_imatrix(tmp_path / "i.dat", imp, {"ctx": 512, "chunks": 3, "tokens": 1536, "calibration_file": "c.txt"}, DAT)
    expected = dat_bytes([("blk.0.ffn_down.weight", 3, imp["model.layers.0.mlp.down_proj.weight"] * 3)], trailer=(3, "c.txt"))
    assert (tmp_path / "i.dat").read_bytes() == expected


def test_a_llama_imatrix_quantizes_exactly_like_the_same_values_in_a_container(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    imp = _importance()
    info = {"ctx": 512, "chunks": 1, "tokens": 512, "calibration_file": "c.txt"}  # powers of two: exact round trips
    save_imatrix(tmp_path / "i.q", imp, info)
    write_llama_imatrix(tmp_path / "i.dat", imp, info, DAT)
    write_llama_imatrix(tmp_path / "i.gguf", imp, info, GGUF)
    outs = {}
    for name in ("i.q", "i.dat", "i.gguf", None):
        out = tmp_path / f"m-{name}.q"
        proc = cli("quantize", folder, "--method", "q4_k_m", "-o", out, *(["--imatrix", tmp_path / name] if name else []))
        assert proc.returncode == 0, proc.stderr
        with qconvert.load(out) as c:
            outs[name] = {n: bytes(c.raw(n)) for n in c.tensors}
    assert outs["i.dat"] == outs["i.q"] == outs["i.gguf"]
    assert outs[None] != outs["i.q"]  # the importance matrix changed the search


@pytest.mark.parametrize("content,pattern", [
    (struct.pack("<i", 2) + struct.pack("<i", 5) + b"blk.0", "ends inside"),
    (struct.pack("<i", -7), "claims -7 entries"),
    (dat_bytes([("blk.0.ffn_down.weight", 1, np.array([1.0, np.nan], np.float32))]), "negative or non-finite"),
    (dat_bytes([("blk.0.ffn_moe.weight", 1, np.ones(4, np.float32))]), "not a llama weight matrix"),
])
def test_a_bad_imatrix_is_one_line(tmp_path, content, pattern):
    folder = make_hf_folder(tmp_path / "tiny")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(content)
    assert_one_line_error(cli("quantize", folder, "--method", "q4_k_m", "--imatrix", bad, "-o", tmp_path / "m.q"), pattern)
    assert not (tmp_path / "m.q").exists()
    with pytest.raises(QConvertError):
        load_imatrix(bad)


@pytest.mark.shared
def test_cli_writes_llama_formats_with_the_same_values(tmp_path):
    src = need_shared(STORIES)
    calib = need_shared(CALIB)
    for name in ("i.q", "i.dat", "i.gguf"):
        proc = cli("imatrix", src, "--calib", calib, "--ctx", "128", "--chunks", "2", "-o", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    ours, _ = load_imatrix(tmp_path / "i.q")
    for name in ("i.dat", "i.gguf"):
        back, info = load_imatrix(tmp_path / name)
        assert back.keys() == ours.keys() and info["chunks"] == 2 and info["datasets"] == ["input.txt"]
        for n in ours:
            np.testing.assert_allclose(back[n], ours[n], rtol=1e-6)
