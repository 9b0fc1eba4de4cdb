"""The numba kernels (qconvert.runtime.kernels) against plain numpy references.

Error bound used throughout. The kernels do exact float32 arithmetic on the weights (no
activation quantisation), so they differ from the float64 product ``W_dequant @ x`` only by
float32 rounding. Dequantised weights are exact (d * q is exact in float32: an 11-bit
mantissa times a <= 6-bit integer; Q4_1/Q5_1's ``+ m`` rounds once, the same way in the
kernels, the codecs and the reference). Each output is a sum computed in SIMD lanes: per
lane at most n/16 sequential multiply-adds (n = row length), then a fixed tree of <= 2 x 5
additions and the per-block scale multiply. The classical bound for a sum of products
computed with k sequential roundings is |error| <= k * u * sum_j |w_j x_j| (u = 2**-24),
where for the types with a block minimum the kernel's sum runs over |d q x| + |m x|
(reference.error_scale). So we assert

    |y - y_ref| <= (n/16 + 32) * 2**-24 * error_scale        (per output element)

which is 1.9e-6 relative for n = 32 and 1.6e-5 relative for n = 4096, i.e. a few ulps of
float32 accumulation, far below any quantisation error. Random data sit ~40x inside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.blocks import by_name
from qconvert.errors import QConvertError
from qconvert.runtime import kernels as K
from qconvert.runtime.kernels import _ir, reference as R

TYPES = list(R.TYPES)  # F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
U = 2.0**-24

# (out, in): odd shapes, a single row, the smallest block, a long row
SHAPES = [(1, 32), (3, 32), (37, 96), (5, 4096), (64, 576)]


def bound(n_in: int, scale: np.ndarray) -> np.ndarray:
    return (n_in / 16 + 32) * U * scale + 1e-30


def make_weights(rng, out_f: int, in_f: int) -> np.ndarray:
    """Normal weights with row scales over 6 decades (exercises the f16 scale exponents),
    one all-zero row (d = 0) and one constant row when there is room."""
    W = rng.standard_normal((out_f, in_f)).astype(np.float32)
    W *= (10.0 ** rng.uniform(-3, 3, size=(out_f, 1))).astype(np.float32)
    if out_f >= 3:
        W[1] = 0.0
        W[2] = 0.75
    return W


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def packed(name: str, W: np.ndarray) -> np.ndarray:
    raw = by_name(name).quantize(W)
    assert raw.shape == (W.shape[0], by_name(name).row_bytes(W.shape[1]))
    return raw


def assert_close(y, y_ref, scale, n_in):
    y = np.asarray(y, dtype=np.float64)
    err = np.abs(y - y_ref)
    lim = bound(n_in, scale)
    worst = np.max(err / lim)
    assert worst <= 1.0, f"error {err.max():.3g} exceeds the bound by {worst:.3g}x"


# ---------------------------------------------------------------------------------------
# registry


def test_every_block_type_has_kernels():
    from qconvert.blocks import all_types

    for bt in all_types():
        if bt.name == "Q8_K":
            continue  # GGML's activation-side type: readable, never a weight qconvert writes
        assert K.has_kernel(bt.name), bt.name
        k = K.get_kernel(bt.name)
        assert (k.block_size, k.type_size) == (bt.block_size, bt.type_size)
    assert K.has_kernel("q4_0") and not K.has_kernel("Q9_9")
    with pytest.raises(QConvertError, match="no kernel"):
        K.linear(np.zeros((1, 18), np.uint8), "Q9_9", np.zeros(32, np.float32))


@pytest.mark.parametrize("name", TYPES)
def test_reference_dequant_equals_codec(name, rng):
    W = make_weights(rng, 9, 96)
    raw = packed(name, W)
    ours = R.dequantize(raw, name, 96)
    codec = by_name(name).dequantize(raw, (9, 96))
    np.testing.assert_array_equal(ours.view(np.uint32), codec.astype(np.float32).view(np.uint32))


# ---------------------------------------------------------------------------------------
# matvec / matmul


@pytest.mark.parametrize("name", TYPES)
def test_matvec_matches_reference(name, rng):
    for out_f, in_f in SHAPES:
        W = make_weights(rng, out_f, in_f)
        raw = packed(name, W)
        x = rng.standard_normal(in_f).astype(np.float32)
        y = K.linear(raw, name, x)
        assert y.shape == (out_f,) and y.dtype == np.float32
        assert_close(y, R.matvec(raw, name, x), R.error_scale(raw, name, x), in_f)
        # and against numpy's own float32 product of the codec's dequantised matrix
        Wd = by_name(name).dequantize(raw, (out_f, in_f))
        assert_close(y, (Wd @ x).astype(np.float64), R.error_scale(raw, name, x), 2 * in_f)


@pytest.mark.parametrize("name", TYPES)
def test_matmul_matches_reference(name, rng):
    for out_f, in_f in SHAPES:
        W = make_weights(rng, out_f, in_f)
        raw = packed(name, W)
        for T in (1, 2, 3, 7):  # 1 and 2 run matvec per token, 3+ the tiled GEMM
            X = rng.standard_normal((T, in_f)).astype(np.float32)
            Y = K.linear(raw, name, X)
            assert Y.shape == (T, out_f) and Y.dtype == np.float32
            assert_close(Y, R.matmul(raw, name, X), R.error_scale(raw, name, X), in_f)


@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q5_1"])
def test_matmul_tiles_and_padding(name, rng):
    """Row counts that are not a multiple of the 16-row work item or the 4-row register
    tile, token counts that are not a multiple of the token tile, more than one tile."""
    in_f = 64
    W = make_weights(rng, 45, in_f)
    raw = packed(name, W)
    X = rng.standard_normal((13, in_f)).astype(np.float32)
    Y = K.linear(raw, name, X)
    assert_close(Y, R.matmul(raw, name, X), R.error_scale(raw, name, X), in_f)
    # each row of the batched product agrees with the single-token product
    for t in (0, 12):
        assert_close(Y[t], K.linear(raw, name, X[t]).astype(np.float64), R.error_scale(raw, name, X[t]), 2 * in_f)


@pytest.mark.parametrize("in_f", [1, 15, 17, 33, 100])
def test_float_types_any_row_length(in_f, rng):
    """F32/F16/BF16 rows need not be a multiple of the 16-lane vector (scalar tail)."""
    W = make_weights(rng, 5, in_f)
    x = rng.standard_normal(in_f).astype(np.float32)
    X = rng.standard_normal((5, in_f)).astype(np.float32)
    for name in ("F32", "F16", "BF16"):
        raw = packed(name, W)
        assert_close(K.linear(raw, name, x), R.matvec(raw, name, x), R.error_scale(raw, name, x), in_f)
        assert_close(K.linear(raw, name, X), R.matmul(raw, name, X), R.error_scale(raw, name, X), in_f)


def test_inputs_are_normalised(rng, tmp_path):
    """float64 / strided x, and a read-only memmap of the packed bytes (never written)."""
    W = make_weights(rng, 24, 64)
    raw = packed("Q4_1", W)
    x64 = rng.standard_normal(128)[::2]  # float64, non-contiguous
    y = K.linear(raw, "Q4_1", x64)
    assert_close(y, R.matvec(raw, "Q4_1", x64.astype(np.float32)), R.error_scale(raw, "Q4_1", x64), 64)

    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    np.testing.assert_array_equal(K.linear(mm, "Q4_1", x64), y)
    X = rng.standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_array_equal(K.linear(mm, "Q4_1", X), K.linear(raw, "Q4_1", X))
    np.testing.assert_array_equal(K.embedding_rows(mm, "Q4_1", [3, 1], 64), R.dequantize(raw, "Q4_1", 64)[[3, 1]])


def test_shape_errors():
    raw = np.zeros((4, 18), np.uint8)
    with pytest.raises(QConvertError, match="take 36 bytes, the packed matrix has 18"):
        K.linear(raw, "Q4_0", np.zeros(64, np.float32))
    with pytest.raises(QConvertError, match="multiple of 32"):
        K.linear(raw, "Q4_0", np.zeros(31, np.float32))
    with pytest.raises(QConvertError, match="uint8"):
        K.linear(raw.astype(np.int16), "Q4_0", np.zeros(32, np.float32))
    with pytest.raises(QConvertError, match="outside the embedding"):
        K.embedding_rows(raw, "Q4_0", [4], 32)
    assert K.linear(raw, "Q4_0", np.zeros((0, 32), np.float32)).shape == (0, 4)


# ---------------------------------------------------------------------------------------
# embedding rows and half floats


@pytest.mark.parametrize("name", TYPES)
def test_embedding_rows_equal_dequantized_rows(name, rng):
    W = make_weights(rng, 50, 96)
    raw = packed(name, W)
    ids = np.array([7, 0, 49, 7, 3])
    got = K.embedding_rows(raw, name, ids, 96)
    want = R.dequantize(raw, name, 96)[ids]
    assert got.shape == (5, 96) and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert K.embedding_rows(raw, name, [], 96).shape == (0, 96)


def _assert_same_floats(got: np.ndarray, want: np.ndarray):
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 too


ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["scalar-hw", "scalar-bits", "vector-hw", "vector-bits"])
def test_half_to_float_every_bit_pattern(mode):
    """Normal, subnormal, +-0, +-inf exact; NaN -> NaN (payload not compared)."""
    _assert_same_floats(_ir.f16_array_to_f32(ALL_HALVES, mode), R.f16_to_f32(ALL_HALVES))


def test_half_scales_and_f16_weights_every_bit_pattern():
    """The same through the kernels: every half as an F16 weight, and as a Q8_0 scale."""
    f16_row = ALL_HALVES.view(np.uint8).reshape(1, -1)
    got = K.embedding_rows(f16_row, "F16", [0], 1 << 16)[0]
    _assert_same_floats(got, R.f16_to_f32(ALL_HALVES))

    blocks = np.zeros((1 << 16, 34), np.uint8)
    blocks[:, 0:2] = ALL_HALVES.view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = 1  # q = 1, so element = d
    got = K.embedding_rows(blocks.reshape(1, -1), "Q8_0", [0], 32 << 16).reshape(-1, 32)
    _assert_same_floats(got[:, 0], R.f16_to_f32(ALL_HALVES))
    _assert_same_floats(got[:, 31], R.f16_to_f32(ALL_HALVES))


def test_inf_and_nan_propagate(rng):
    W = rng.standard_normal((3, 32)).astype(np.float32)
    raw = packed("F16", W)
    raw.view(np.uint16)[0, 5] = 0x7C00  # +inf weight
    raw.view(np.uint16)[1, 9] = 0x7E00  # NaN weight
    y = K.linear(raw, "F16", np.ones(32, np.float32))
    assert np.isposinf(y[0]) and np.isnan(y[1]) and np.isfinite(y[2])


# ---------------------------------------------------------------------------------------
# extension point


def test_register_kernel_with_only_dequant_rows(rng):
    """A new block type needs only a row decoder; matvec and matmul are derived."""

    def dequant_rows(raw, ids, row_length, out=None):  # "I8": one int8 per element, scale 1/64
        vals = raw[ids].view(np.int8).astype(np.float32) / 64
        if out is None:
            return vals
        out[...] = vals
        return out

    K.register_kernel("TEST_I8", dequant_rows=dequant_rows, block_size=1, type_size=1)
    try:
        raw = rng.integers(0, 256, size=(21, 40), dtype=np.uint8)
        W = raw.view(np.int8).astype(np.float64) / 64
        x = rng.standard_normal(40).astype(np.float32)
        X = rng.standard_normal((6, 40)).astype(np.float32)
        scale = np.abs(W) @ np.abs(x.astype(np.float64))
        assert_close(K.linear(raw, "TEST_I8", x), W @ x, scale, 40)
        assert_close(K.linear(raw, "TEST_I8", X), X.astype(np.float64) @ W.T, np.abs(X) @ np.abs(W).T, 40)
        np.testing.assert_array_equal(K.embedding_rows(raw, "test_i8", [2], 40)[0], W[2].astype(np.float32))
        with pytest.raises(ValueError, match="twice"):
            K.register_kernel("TEST_I8", dequant_rows=dequant_rows)
    finally:
        K._KERNELS.pop("TEST_I8", None)


@pytest.mark.parametrize("tile", [(16, 4, 4), (8, 4, 2), (4, 2, 2)], ids=["avx512", "avx2", "narrow"])
def test_gemm_register_tiles(tile, rng):
    """The GEMM micro-kernel with each register-tile shape the kernels may pick on some host
    (LLVM legalises the vector widths on any CPU), with ragged rows and tokens."""
    from numba import njit

    lanes, mr, nr_tok = tile
    gemm = _ir.make_gemm_rows(lanes, mr, nr_tok)

    @njit
    def run(buf, nr, Xp, t_valid, out, r0):
        gemm(buf, nr, Xp, t_valid, out, r0)

    k = 3 * lanes
    rows, T, r0 = 7, 5, 2
    buf = np.zeros((-(-rows // mr) * mr, k), np.float32)
    buf[:rows] = rng.standard_normal((rows, k))
    Xp = np.zeros((-(-T // nr_tok) * nr_tok, k), np.float32)
    Xp[:T] = rng.standard_normal((T, k))
    out = np.full((T, rows + r0 + 1), 7.0, np.float32)
    run(buf, rows, Xp, T, out, r0)
    want = Xp[:T].astype(np.float64) @ buf[:rows].astype(np.float64).T
    assert_close(out[:, r0 : r0 + rows], want, np.abs(Xp[:T]) @ np.abs(buf[:rows]).T, k)
    assert (out[:, :r0] == 7.0).all() and (out[:, r0 + rows :] == 7.0).all()  # nothing else written
