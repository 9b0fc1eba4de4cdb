"""IQ4_NL and IQ4_XS (llama.cpp's 4-bit non-linear i-quants, blocks/iquants.py).

- decoding equals gguf-py's ``gguf.quants.dequantize`` bit for bit, on random bytes and on
  bytes we write;
- optional tier: the bytes equal llama.cpp's own ``ggml_quantize_chunk`` (``quantize_iq4_nl`` /
  ``quantize_iq4_xs``), with and without an importance vector, on synthetic rows with outliers,
  zeros, ties and tiny/huge scales, and on SmolLM2's real ffn_down rows. The library is found
  as in tests/test_kquants.py: ``QCONVERT_GGML_BASE_LIB`` or llama-cpp-python's bundled one.
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.blocks import by_name
from qconvert.errors import QConvertError
from tests.test_kquants import _ffn_down, _ggml_quantize_chunk, _skewed_importance

NAMES = ["IQ4_NL", "IQ4_XS"]


def _gguf():
    return pytest.importorskip("gguf", reason="gguf-py (the `gguf` package) is not installed")


def _rows() -> np.ndarray:
    """8 rows x 2048 with the corners of the search: outliers, all-zero groups and whole
    super-blocks, a constant piece, exact ties, tiny and huge magnitudes, one-signed pieces."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 2048)).astype(np.float32)
    x[0, rng.random(2048) < 0.03] *= 50
    x[1, :256] = 0
    x[1, 256::64] = 0
    x[1, 512:544] = 0
    x[2] = (rng.integers(-8, 8, 2048) / 2).astype(np.float32)
    x[3, :512] = -0.7
    x[3, 512:] *= np.float32(1e-6)
    x[4] *= np.float32(1e4)
    x[5] = np.abs(x[5]) + 0.5
    x[6] = -np.abs(x[6])
    x[7, 1000:1100] = 0
    x[7, 5] = 1e-20
    return x


def _same_floats(a, b):
    a = np.asarray(a, np.float32).reshape(-1)
    b = np.asarray(b, np.float32).reshape(-1)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name,type_id,block,size", [("IQ4_NL", 20, 32, 18), ("IQ4_XS", 23, 256, 136)])
def test_registry_entries(name, type_id, block, size):
    bt = by_name(name)
    assert (bt.id, bt.block_size, bt.type_size, bt.ggml) == (type_id, block, size, True)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_bytes_matches_gguf(name):
    gguf = _gguf()
    bt = by_name(name)
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (64, bt.type_size), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(rng.standard_normal(64).astype(np.float16).tobytes(), np.uint8).reshape(64, 2)
    want = gguf.quants.dequantize(raw.reshape(-1), getattr(gguf.GGMLQuantizationType, name))
    _same_floats(bt.dequantize(raw, (64 * bt.block_size,)), want)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_our_bytes_matches_gguf(name):
    gguf = _gguf()
    bt = by_name(name)
    x = _rows()
    for imp in (None, _skewed_importance(x.shape[1])):
        raw = bt.quantize(x, imp)
        want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
        _same_floats(bt.dequantize(raw, x.shape), want)


@pytest.mark.parametrize("name", NAMES)
def test_errors_small_and_importance_helps(name):
    bt = by_name(name)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    y = bt.dequantize(bt.quantize(x), x.shape)
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel < 0.11, rel
    imp = _skewed_importance(1024)
    yi = bt.dequantize(bt.quantize(x, imp), x.shape)
    assert np.sum(imp * (yi - x) ** 2) < np.sum(imp * (y - x) ** 2)


def test_zero_blocks():
    nl, xs = by_name("IQ4_NL"), by_name("IQ4_XS")
    z = np.zeros((1, 256), np.float32)
    assert nl.quantize(z).reshape(-1, 18)[:, 2:].tolist() == [[0x88] * 16] * 8
    assert not nl.dequantize(nl.quantize(z), z.shape).any()
    raw = xs.quantize(z)
    assert raw[0, :2].tolist() == [0, 0x80]  # f16(-0.0), as llama.cpp
    assert not xs.dequantize(raw, z.shape).any()


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_and_importance_raise(name):
    bt = by_name(name)
    with pytest.raises(QConvertError):
        bt.quantize(np.zeros((2, bt.block_size + 16), np.float32))
    with pytest.raises(QConvertError):
        bt.quantize(np.zeros((2, 256), np.float32), np.ones(255, np.float32))
    with pytest.raises(QConvertError):
        bt.quantize(np.zeros((2, 256), np.float32), np.full(256, np.nan, np.float32))


# --- optional: llama.cpp's own C quantizers --------------------------------------------------------


@pytest.fixture(scope="module")
def ggml_quantize():
    import ctypes

    _ggml_quantize_chunk()  # skips, with the reason, when no libggml-base is found
    import os
    from pathlib import Path

    path = os.environ.get("QCONVERT_GGML_BASE_LIB")
    if not path:
        import llama_cpp

        path = str(sorted((Path(llama_cpp.__file__).resolve().parent / "lib").glob("*ggml-base*"))[0])
    f = ctypes.CDLL(path).ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(bt, rows, importance):
        rows = np.ascontiguousarray(rows, np.float32)
        out = np.zeros((rows.shape[0], bt.row_bytes(rows.shape[1])), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
        n = f(bt.id, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None if imp is None else imp.ctypes.data)
        assert n == out.nbytes
        return out

    return quantize


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_reference_synthetic(ggml_quantize, name):
    """Byte identity with llama.cpp: 8 corner rows x 2048 and 16 gaussian rows x 4096 (one
    with 2% outliers x60, one scaled 1e-3), with and without a skewed importance vector."""
    bt = by_name(name)
    rng = np.random.default_rng(21)
    g = rng.standard_normal((16, 4096)).astype(np.float32)
    g[3] *= 1e-3
    g[5, rng.random(4096) < 0.02] *= 60
    for rows in (_rows(), g):
        for imp in (None, _skewed_importance(rows.shape[1])):
            assert np.array_equal(bt.quantize(rows, imp), ggml_quantize(bt, rows, imp)), (name, imp is not None)


@pytest.mark.shared
@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_reference_real_tensor(ggml_quantize, name):
    """All 576 rows of SmolLM2's layer-0 ffn_down (1536 wide), with and without importance."""
    bt = by_name(name)
    w = _ffn_down()
    imp = (np.mean(w.astype(np.float64) ** 2, axis=0) * 1e4 + _skewed_importance(w.shape[1])).astype(np.float32)
    for importance in (None, imp):
        assert np.array_equal(bt.quantize(w, importance), ggml_quantize(bt, w, importance))


# --- runtime kernels ----------------------------------------------------------------------------

U = 2.0**-24


@pytest.mark.parametrize("name", NAMES)
def test_kernels_match_reference(name):
    """dequant_rows equals the numpy reference and the codec bit for bit; matvec / matmul are
    within float32 accumulation error of the float64 reference. Per output the kernels round
    at most n (the 32-group sums, the scaled adds) + n/32 times, in the GEMM fewer, so
    |y - y_ref| <= (n + 64) u sum|w x|."""
    from qconvert.runtime import kernels as K
    from qconvert.runtime.kernels import reference_iquants as R

    bt = by_name(name)
    rng = np.random.default_rng(9)
    assert K.get_kernel(name).block_size == bt.block_size
    for out_f, in_f in ((1, 256), (3, 512), (37, 1536), (20, 4096)):
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        W *= (10.0 ** rng.uniform(-3, 3, size=(out_f, 1))).astype(np.float32)
        if out_f >= 3:
            W[1] = 0
            W[2, :300] = 0.75
        raw = bt.quantize(W)
        ref = R.dequantize(raw, name, in_f)
        _same_floats(ref, bt.dequantize(raw, W.shape))
        ids = np.array([out_f - 1, 0, out_f // 2], np.int64)
        _same_floats(K.embedding_rows(raw, name, ids, in_f), ref[ids])
        for T in (1, 2, 5):
            X = rng.standard_normal((T, in_f)).astype(np.float32)
            Y = K.linear(raw, name, X)
            lim = (in_f + 64) * U * R.error_scale(raw, name, X) + 1e-30
            assert np.all(np.abs(Y - R.matmul(raw, name, X)) <= lim), (name, out_f, in_f, T)
        y = K.linear(raw, name, X[0])
        lim = (in_f + 64) * U * R.error_scale(raw, name, X[0]) + 1e-30
        assert np.all(np.abs(y - R.matvec(raw, name, X[0])) <= lim)


# --- llama.cpp's IQ4_NL / IQ4_XS mixes, the runtime and GGUF ------------------------------------


def test_mix_rules():
    """llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_IQ4_NL (25) / IQ4_XS (30)."""
    from qconvert.methods.mixes import MIXES, fallback, mix_type, model_shape, output_type

    for f, t, ftype in (("iq4_nl", "IQ4_NL", 25), ("iq4_xs", "IQ4_XS", 30)):
        mix = MIXES[f]
        assert (mix.default, mix.ftype) == (t, ftype)
        gqa2, gqa4 = model_shape(16, 8, 4), model_shape(16, 8, 2)
        assert mix_type(mix, "attn_q", 0, gqa2) == t
        assert mix_type(mix, "attn_v", 5, gqa2) == t and mix_type(mix, "attn_v", 5, gqa4) == "Q5_K"
        assert mix_type(mix, "ffn_down", 1, gqa2) == "Q5_K" and mix_type(mix, "ffn_down", 2, gqa2) == t
        assert mix_type(mix, "ffn_down", 1, gqa2, has_imatrix=True) == t
        assert mix_type(mix, "attn_output", 3, gqa2) == t
        moe8 = model_shape(16, 8, 8, n_expert=8)
        assert mix_type(mix, "attn_output", 3, moe8) == "Q5_K" and mix_type(mix, "attn_k", 3, moe8) == "Q8_0"
        assert output_type(mix, 4096) == "Q6_K" and output_type(mix, 576) == "Q8_0"
    assert fallback("IQ4_XS", 576)[0] == "IQ4_NL"
    assert fallback("IQ4_XS", 1536) == ("IQ4_XS", None)
    assert fallback("IQ4_NL", 100)[0] == "F16"


@pytest.mark.shared
@pytest.mark.parametrize("method", ["iq4_nl", "iq4_xs"])
def test_stories_quantize_run_and_gguf_round_trip(tmp_path, method):
    """stories260K (64-wide rows: IQ4_XS falls back to IQ4_NL as in llama.cpp, ffn_down's 172
    to F16): quantize, generate with the runtime, export to GGUF, gguf-py decodes our bytes,
    and re-importing the GGUF gives the container's bytes back."""
    import qconvert
    from qconvert.export.gguf import export_gguf
    from qconvert.runtime.generate import generate
    from qconvert.runtime.models import load_model
    from tests.conftest import STORIES, need_shared
    from tests.test_export_gguf import _round_trip_bytes_equal

    gguf = _gguf()
    need_shared(STORIES)
    qconvert.quantize(STORIES, tmp_path / "s.q", method=method)
    with qconvert.load(tmp_path / "s.q") as c:
        types = {n: i.block_type.name for n, i in c.tensors.items()}
        assert types["model.layers.0.self_attn.q_proj.weight"] == "IQ4_NL"
        assert types["model.layers.0.mlp.down_proj.weight"] == "F16"
        model = load_model(c)
        assert len(generate(model, [1, 403, 407], max_tokens=5).ids) == 5
        summary = export_gguf(c, tmp_path / "s.gguf")
    assert summary["types"]["IQ4_NL"] > 0
    assert summary["file_type"] == (25 if method == "iq4_nl" else 30)
    _round_trip_bytes_equal(tmp_path / "s.q", tmp_path / "s.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.IQ4_NL
    with qconvert.load(tmp_path / "s.q") as c:
        ours = c.tensor("model.layers.0.self_attn.q_proj.weight")
    theirs = gguf.quants.dequantize(t.data, t.tensor_type)
    # the export permutes q rows (llama.cpp's rotary layout): compare as multisets of rows
    assert sorted(map(bytes, np.asarray(ours, np.float32))) == sorted(map(bytes, np.asarray(theirs, np.float32)))


def test_iq4_xs_container_runs(tmp_path):
    """A 256-wide tiny llama (random weights): IQ4_XS matrices run in the runtime, and the
    logits are no farther from the float model's than Q4_0's (rtn -b 4) are."""
    import json

    import qconvert
    from qconvert.runtime.models import load_model
    from tests.conftest import make_hf_folder, tiny_llama_config, tiny_llama_tensors

    folder = make_hf_folder(tmp_path / "tiny", tensors=tiny_llama_tensors(hidden=256, inter=512, layers=2))
    (folder / "config.json").write_text(json.dumps(tiny_llama_config(hidden=256, inter=512, layers=2)))
    qconvert.quantize(folder, tmp_path / "t.q", method="iq4_xs")
    qconvert.quantize(folder, tmp_path / "f.q", method="f32")
    qconvert.quantize(folder, tmp_path / "q4.q", bits=4)
    with qconvert.load(tmp_path / "t.q") as c, qconvert.load(tmp_path / "f.q") as f, qconvert.load(tmp_path / "q4.q") as q4:
        types = {i.block_type.name for i in c.tensors.values()}
        assert "IQ4_XS" in types, types
        ids = np.array([1, 5, 9, 30])
        mc, mf = load_model(c), load_model(f)
        a = mc.forward(ids, mc.new_cache(16))
        b = mf.forward(ids, mf.new_cache(16))
        m4 = load_model(q4)
        r = m4.forward(ids, m4.new_cache(16))
    a, b, r = (np.asarray(v, np.float64) for v in (a, b, r))
    assert a.shape == b.shape and np.all(np.isfinite(a))
    err, err_q4 = np.sqrt(np.mean((a - b) ** 2)), np.sqrt(np.mean((r - b) ** 2))
    assert err <= 1.2 * err_q4, (err, err_q4)


@pytest.mark.parametrize("name", NAMES)
def test_numba_equals_plain_reference(name):
    """The numba kernels equal the line-by-line float32-scalar port of llama.cpp
    (blocks/iquants_reference.py) on the corner rows, with and without importance (the
    fresh-machine check of the search; the llama.cpp tier above checks the port itself)."""
    from qconvert.blocks import iquants_reference

    bt = by_name(name)
    x = _rows()[:, :512]
    for imp in (None, _skewed_importance(512)):
        assert np.array_equal(bt.quantize(x, imp), iquants_reference.quantize(bt.id, x, imp)), (name, imp is not None)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name,ftype,with_imatrix", [("IQ4_NL", 25, True), ("IQ4_XS", 30, False), ("IQ4_XS", 30, True)])
def test_llama_model_quantize_end_to_end(tmp_path, name, ftype, with_imatrix):
    """What llama-quantize writes: SmolLM2 (Q4_1) through ``llama_model_quantize`` with
    ``pure`` (IQ4_XS's 576-wide tensors fall back to IQ4_NL, llama.cpp's own rule) and
    optionally an importance matrix. Our bytes must equal llama.cpp's for all 30 ffn_down
    tensors and every quantized tensor of layers 0 and 29 (the rest would only cost time)."""
    import ctypes

    from qconvert.blocks import by_id
    from tests.test_kquants import SMOLLM_GGUF, _llama_cpp

    llama_cpp = _llama_cpp()
    gguf = _gguf()
    if not SMOLLM_GGUF.exists():
        pytest.skip(f"needs {SMOLLM_GGUF} (the shared/ folder beside the repo with real models); absent here")
    src = {t.name: t for t in gguf.GGUFReader(SMOLLM_GGUF).tensors}
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = ftype
    params.pure = True
    params.allow_requantize = True
    imatrix: dict[str, np.ndarray] = {}
    keep = []
    if with_imatrix:
        mats = [(n, t) for n, t in src.items() if len(t.shape) == 2]
        entries = (llama_cpp.llama_model_imatrix_data * (len(mats) + 1))()
        for k, (n, t) in enumerate(mats):
            v = _skewed_importance(int(t.shape[0]), seed=k)
            imatrix[n] = v
            keep += [v, n.encode()]
            entries[k].name = keep[-1]
            entries[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[k].size = v.size
        entries[len(mats)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    out = tmp_path / f"{name}.gguf"
    assert llama_cpp.llama_model_quantize(str(SMOLLM_GGUF).encode(), str(out).encode(), ctypes.byref(params)) == 0
    compared: dict[str, int] = {}
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type.name in ("F32", "F16") or not (
            "ffn_down" in t.name or t.name.startswith(("blk.0.", "blk.29."))
        ):
            continue
        bt = by_id(int(t.tensor_type.value))
        s = src[t.name]
        rows, n = int(np.prod(s.shape[1:])), int(s.shape[0])  # GGUF lists the row length first
        x = by_id(int(s.tensor_type.value)).dequantize(np.asarray(s.data).reshape(-1), (rows, n))
        theirs = np.asarray(t.data).reshape(rows, -1)
        assert np.array_equal(bt.quantize(x, imatrix.get(t.name)), theirs), (t.name, bt.name)
        compared[bt.name] = compared.get(bt.name, 0) + 1
    if name == "IQ4_XS":
        assert compared == {"IQ4_XS": 30, "IQ4_NL": 12}, compared
    else:
        assert compared == {"IQ4_NL": 42}, compared
