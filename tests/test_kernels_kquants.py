"""The K-quant kernels (qconvert.runtime.kernels.kquants) against numpy and gguf-py.

Test data are random valid blocks (reference_kquants.random_blocks): every quant, scale and
min byte uniform, d and dmin finite halves over six decades (normal and subnormal), d of
either sign for the symmetric types. No codec is involved, so every bit pattern of the
scales and quants is exercised.

Error bounds. Every element is w = dl * q - ml (dl = d * sc, ml = dmin * m; dl * q is exact
in float32). The exact reference (R.parts in float64) is sum_j (dl_j q_j - ml_j) x_j. A sum
of products computed with k sequential float32 roundings is off by at most
k * u * sum_j |term_j| (u = 2**-24); the kernels sum the scale part and the min part
separately, so the terms are |dl q x| and |ml x| (``Ref.mag``). Roundings per output:
- matvec (and T < 3): q x (+1 add for 32-element sub-blocks), the scaled add into one of 4
  rotating accumulators: n/64 adds per lane, then 3 + 4 reduction adds, the final
  subtraction (n/64 + 10); the min part: <= 31 adds in xsum, 1 multiply-add, n/256 adds
  per lane, 4 reduction levels, the subtraction (n/256 + 37). Bound: (n/64 + 40) u mag.
- matmul (T >= 3): the dequantised float32 tile (one rounding of dl q - ml, <= u/2 |w|),
  n/L multiply-adds per lane of the GEMM micro-kernel (L = _ir.GEMM_LANES: 16 on AVX-512,
  8 otherwise), a log2(L)-level transposing reduction. Bound: (n/L + 8) u mag.
Against gguf-py's float32 dequantised matrix (in float64), whose elements are the exact ones
rounded once (<= u/2 |w|), the bound adds u * sum_j |w_j x_j|. dequant_rows must equal
gguf-py bit for bit. Random data sit 40x (n = 256) to 250x (n = 4096) inside the bounds.
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.runtime import kernels as K
from qconvert.runtime.kernels import _ir, reference_kquants as R

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

TYPES = list(R.TYPES)  # Q2_K Q3_K Q4_K Q5_K Q6_K
U = 2.0**-24
OUTS = (1, 3, 37, 64)
INS = (256, 512, 1536, 4096)


def bound(n_in: int, scale: np.ndarray, gemm: bool = False) -> np.ndarray:
    """Rounding-error bound of a kernel product (module docstring); scale = sum |term|."""
    k = n_in / _ir.GEMM_LANES + 8 if gemm else n_in / 64 + 40
    return k * U * scale + 1e-30


def assert_close(y, y_ref, lim):
    err = np.abs(np.asarray(y, dtype=np.float64) - y_ref)
    worst = np.max(err / lim)
    assert worst <= 1.0, f"error {err.max():.3g} exceeds the bound by {worst:.3g}x"


def gguf_dequant(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        vals = gguf_quants.dequantize(raw, getattr(GGMLQuantizationType, name))
    return np.asarray(vals, dtype=np.float32).reshape(raw.shape[0], row_length)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240607)


class Ref:
    """The float64 matrices the checks need, computed once per packed matrix: the exact
    weights, |dl q| + |ml| (error scale), gguf-py's float32 dequantisation and its |w|."""

    def __init__(self, raw: np.ndarray, name: str, n: int):
        dl, q, ml = R.parts(raw, name, n)
        self.raw, self.n = raw, n
        self.exact = dl.astype(np.float64) * q - ml.astype(np.float64)
        self.mag = np.abs(dl.astype(np.float64) * q) + np.abs(ml.astype(np.float64))
        self.gguf = gguf_dequant(raw, name, n).astype(np.float64)

    def check(self, y, x):
        """y (out,) or (T, out) against x (in,) or (T, in), both references."""
        x = np.asarray(x, dtype=np.float64)
        gemm = x.ndim == 2 and x.shape[0] >= K.SMALL_T
        lim = bound(self.n, np.abs(x) @ self.mag.T, gemm)
        assert_close(y, x @ self.exact.T, lim)
        assert_close(y, x @ self.gguf.T, lim + U * (np.abs(x) @ np.abs(self.gguf).T))


@pytest.fixture(scope="module")
def mats():
    """name -> {(out, in): Ref} for every shape, built once."""
    rng = np.random.default_rng(7)
    return {
        name: {(o, n): Ref(R.random_blocks(rng, name, o, n), name, n) for o in OUTS for n in INS} for name in TYPES
    }


def test_registered_with_sizes():
    from qconvert.blocks import all_types

    for name in TYPES:
        k = K.get_kernel(name)
        assert (k.block_size, k.type_size) == (256, R.TYPE_SIZE[name])
    for bt in all_types():  # once the K-quant codecs are registered, their sizes must agree
        if bt.name in R.TYPE_SIZE:
            assert (bt.block_size, bt.type_size) == (256, R.TYPE_SIZE[bt.name])


@pytest.mark.parametrize("name", TYPES)
def test_reference_dequant_is_gguf(name, mats):
    """The independent numpy reference, and the kernels' dequant_rows, are bit-identical to
    gguf-py's dequantize (also for all-random bytes, where d may be inf/NaN)."""
    rng = np.random.default_rng(3)
    wild = rng.integers(0, 256, size=(8, 2 * R.TYPE_SIZE[name]), dtype=np.uint8)
    for raw, n in [(mats[name][(37, 1536)].raw, 1536), (wild, 512)]:
        want = gguf_dequant(raw, name, n)
        nan = np.isnan(want)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the wild blocks
            ref = R.dequantize(raw, name, n)
        for got in (ref, K.embedding_rows(raw, name, np.arange(raw.shape[0]), n)):
            np.testing.assert_array_equal(np.isnan(got), nan)
            np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_dequant_rows_subset_and_buffer(name, mats):
    raw = mats[name][(64, 512)].raw
    want = gguf_dequant(raw, name, 512)
    ids = np.array([63, 0, 5, 5, 40])
    got = K.embedding_rows(raw, name, ids, 512)
    np.testing.assert_array_equal(got.view(np.uint32), want[ids].view(np.uint32))
    buf = np.full((2, 512), np.nan, np.float32)
    K.get_kernel(name).dequant_rows(raw, np.array([7, 9], np.int64), 512, buf)
    np.testing.assert_array_equal(buf.view(np.uint32), want[[7, 9]].view(np.uint32))
    assert K.embedding_rows(raw, name, [], 512).shape == (0, 512)


@pytest.mark.parametrize("name", TYPES)
def test_matvec(name, mats, rng):
    for (out_f, in_f), ref in mats[name].items():
        x = rng.standard_normal(in_f).astype(np.float32)
        y = K.linear(ref.raw, name, x)
        assert y.shape == (out_f,) and y.dtype == np.float32
        ref.check(y, x)
    # and the reference module's own functions agree with the cached ones
    assert_close(y, R.matvec(ref.raw, name, x), bound(in_f, R.error_scale(ref.raw, name, x)))


@pytest.mark.parametrize("name", TYPES)
def test_matmul(name, mats, rng):
    for (out_f, in_f), ref in mats[name].items():
        for T in (1, 2, 3, 7):  # 1 and 2 run matvec per token, 3+ the tiled GEMM
            X = rng.standard_normal((T, in_f)).astype(np.float32)
            Y = K.linear(ref.raw, name, X)
            assert Y.shape == (T, out_f) and Y.dtype == np.float32
            ref.check(Y, X)


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K"])
def test_matmul_tiles_and_batched_rows_agree(name, rng):
    """45 rows (not a multiple of the 16-row work item or the register tile), 13 tokens;
    each token's row of the batched product agrees with the single-token product."""
    raw = R.random_blocks(rng, name, 45, 512)
    X = rng.standard_normal((13, 512)).astype(np.float32)
    Y = K.linear(raw, name, X)
    assert_close(Y, R.matmul(raw, name, X), bound(512, R.error_scale(raw, name, X), gemm=True))
    for t in (0, 12):
        lim = bound(512, R.error_scale(raw, name, X[t]), gemm=True) + bound(512, R.error_scale(raw, name, X[t]))
        assert_close(Y[t], K.linear(raw, name, X[t]).astype(np.float64), lim)


def test_constant_and_extreme_blocks():
    """Hand-made blocks: all-zero bytes give zeros; max scales and quants with the largest
    finite d stay finite and exact; a negative zero d is handled like numpy."""
    n = 256
    x = np.linspace(-1, 1, n).astype(np.float32)
    for name in TYPES:
        size = R.TYPE_SIZE[name]
        zero = np.zeros((1, size), np.uint8)
        assert (K.linear(zero, name, x) == 0).all()
        full = np.full((2, size), 0xFF, np.uint8)
        for off in R.HALF_OFFSETS[name]:
            if off is not None:
                full[0, off : off + 2] = np.array([np.float16(1.0)]).view(np.uint8)
                full[1, off : off + 2] = np.array([np.float16(-0.0)]).view(np.uint8)
        want = gguf_dequant(full, name, n)
        np.testing.assert_array_equal(K.embedding_rows(full, name, [0, 1], n).view(np.uint32), want.view(np.uint32))
        assert_close(K.linear(full, name, x), R.matvec(full, name, x), bound(n, R.error_scale(full, name, x)))
        assert_close(K.linear(zero, name, x), R.matvec(zero, name, x), bound(n, R.error_scale(zero, name, x)))


def test_shape_errors():
    from qconvert.errors import QConvertError

    raw = np.zeros((4, 144), np.uint8)
    with pytest.raises(QConvertError, match="multiple of 256"):
        K.linear(raw, "Q4_K", np.zeros(576, np.float32))
    with pytest.raises(QConvertError, match="take 288 bytes"):
        K.linear(raw, "Q4_K", np.zeros(512, np.float32))


def test_readonly_memmap(tmp_path, rng):
    raw = R.random_blocks(rng, "Q5_K", 20, 512)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    x = rng.standard_normal(512).astype(np.float32)
    X = rng.standard_normal((4, 512)).astype(np.float32)
    np.testing.assert_array_equal(K.linear(mm, "Q5_K", x), K.linear(raw, "Q5_K", x))
    np.testing.assert_array_equal(K.linear(mm, "Q5_K", X), K.linear(raw, "Q5_K", X))
