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
