"""Group-wise integer blocks I{bits}G{group}: the codec, pack/unpack for GPTQ/AWQ results,
and the kernels (qconvert/blocks/groupwise.py, qconvert/runtime/kernels/groupwise.py).

Kernel error bound. Decoded weights are exact (q - zero is a small integer, times an f16
scale: exact in float32), so the kernels differ from the float64 product W_dequant @ x only
by float32 rounding. Roundings per output, n = row length, g = group:
- matvec (and T < 3): one per product (q - zero) * x, at most g/16 - 1 adds inside a block,
  the multiply by the scale, n/(4g) adds into one of 4 rotating accumulators, 2 adds joining
  them and 4 levels of horizontal sum: <= n/128 + g/16 + 8 <= n/64 + 16.
- matmul (T >= 3): the dequantised tile is exact; the GEMM micro-kernel does n/L sequential
  multiply-adds per lane (L = _ir.GEMM_LANES) and a log2(L)-level reduction: <= n/L + 8.
A sum computed with k sequential roundings is off by at most k u sum_j |w_j x_j| (u = 2**-24),
so the tests assert |y - y_ref| <= (k + 4) u sum_j |w_j x_j|. dequant_rows (and the codec)
must equal the independent numpy reference bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.blocks import all_types, by_id, by_name
from qconvert.blocks import groupwise as GW
from qconvert.errors import QConvertError
from qconvert.blocks.grid import rtn_groupwise
from qconvert.runtime import kernels as K
from qconvert.runtime.kernels import _ir, reference_groupwise as R

TYPES = list(R.TYPES)
U = 2.0**-24
OUTS = (1, 3, 37)
INS = (128, 384, 1536)
TOKENS = (1, 2, 3, 7)


def bits_group(name: str) -> tuple[int, int]:
    return R.params(name)


def random_parts(rng, bits: int, group: int, out_f: int, in_f: int):
    """Random q, fp16-exact scales (float32) and integer zeros, as GPTQ/AWQ would give."""
    ng = in_f // group
    q = rng.integers(0, 1 << bits, size=(out_f, in_f), dtype=np.uint8)
    scales = np.exp2(rng.uniform(-12, 2, size=(out_f, ng))).astype(np.float16).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, size=(out_f, ng)).astype(np.int32)
    return q, scales, zeros


# --- registry ---------------------------------------------------------------------------


def test_family_registered():
    names = [t.name for t in all_types() if GW.parse_type(t.name)]
    assert sorted(names) == sorted(TYPES)
    for bits in GW.BITS:
        for group in GW.GROUPS:
            bt = GW.groupwise_type(bits, group)
            assert bt.name == f"I{bits}G{group}"
            assert bt.id == 300 + 10 * bits + {32: 0, 64: 1, 128: 2}[group]
            assert by_id(bt.id) is bt
            assert (bt.block_size, bt.type_size) == (group, 3 + bits * group // 8)
            assert bt.ggml is False and not bt.has_params
            assert GW.parse_type(bt.name.lower()) == (bits, group)
            k = K.get_kernel(bt.name)
            assert (k.block_size, k.type_size) == (bt.block_size, bt.type_size)
    assert by_name("I4G128").type_size == 67 and by_name("I4G128").bits_per_weight == 4.1875
    for bad in ((5, 128), (4, 256), (4, -1)):
        with pytest.raises(QConvertError):
            GW.type_name(*bad)
    assert GW.parse_type("Q4_0") is None


# --- pack / unpack ----------------------------------------------------------------------


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_round_trip(name):
    bits, group = bits_group(name)
    rng = np.random.default_rng(bits * 1000 + group)
    q, scales, zeros = random_parts(rng, bits, group, 5, 3 * group)
    raw = GW.pack_groupwise(q, scales, zeros, bits, group)
    assert raw.dtype == np.uint8 and raw.shape == (5, by_name(name).row_bytes(3 * group))
    q2, s2, z2 = GW.unpack_groupwise(raw, bits, group, 3 * group)
    assert q2.dtype == np.uint8 and s2.dtype == np.float32 and z2.dtype == np.int32
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, scales)
    np.testing.assert_array_equal(z2, zeros)
    # the bytes, read bit by bit by the independent reference
    rq, rs, rz = R.parts(raw, name, 3 * group)
    np.testing.assert_array_equal(rq, q)
    np.testing.assert_array_equal(rs, scales)
    np.testing.assert_array_equal(rz, zeros)
    # other accepted input dtypes give the same bytes
    raw16 = GW.pack_groupwise(q.astype(np.int64), scales.astype(np.float16), zeros.astype(np.float64), bits, group)
    np.testing.assert_array_equal(raw16, raw)
    # flat bytes unpack the same
    np.testing.assert_array_equal(GW.unpack_groupwise(raw.reshape(-1), bits, group, 3 * group)[0], q)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_q_minus_zero_times_scale(name):
    bits, group = bits_group(name)
    rng = np.random.default_rng(group + bits)
    n = 2 * group
    q, scales, zeros = random_parts(rng, bits, group, 4, n)
    raw = GW.pack_groupwise(q, scales, zeros, bits, group)
    want = ((q.astype(np.float64) - np.repeat(zeros, group, 1)) * np.repeat(scales, group, 1)).astype(np.float32)
    want32 = (q.astype(np.int32) - np.repeat(zeros, group, 1)).astype(np.float32) * np.repeat(scales, group, 1)
    np.testing.assert_array_equal(want32.view(np.uint32), want.view(np.uint32))  # exact either way
    got = by_name(name).dequantize(raw, (4, n))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # any bytes: codec, reference and kernel agree bit for bit (inf/NaN scales included)
    wild = rng.integers(0, 256, size=(6, by_name(name).row_bytes(n)), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        a = by_name(name).dequantize(wild, (6, n))
        b = R.dequantize(wild, name, n)
    c = K.embedding_rows(wild, name, np.arange(6), n)
    for other in (b, c):
        np.testing.assert_array_equal(np.isnan(other), np.isnan(a))
        np.testing.assert_array_equal(other[~np.isnan(a)].view(np.uint32), a[~np.isnan(a)].view(np.uint32))


def test_worked_examples_of_the_spec():
    """The bit packing examples of FORMAT.md (spec/_groupwise_section.md)."""
    x = np.array(
        [0.390625, 0.28125, -0.38671875, 4.3125, -0.0859375, 0.72265625, 0.80078125, 0.546875,
         0.20703125, 0.9609375, 0.73828125, -0.1328125, -0.63671875, -0.21875, -0.25390625, 0.4140625,
         -1.140625, -0.11328125, 1.00390625, -0.55078125, -0.45703125, -0.05078125, -0.8515625, -0.078125,
         -0.0078125, -0.00390625, -0.59375, -0.21875, 0.390625, -0.4296875, 0.328125, 0.39453125],
        dtype=np.float32,
    )  # fmt: skip
    raw4 = by_name("I4G32").quantize(x)
    assert raw4.tobytes().hex(" ") == "d1 35 03 44 f2 53 55 64 35 21 42 30 16 32 31 33 21 24 44"
    raw3 = by_name("I3G32").quantize(x)
    assert raw3.tobytes().hex(" ") == "3b 3a 01 4a 1e 49 91 82 44 88 80 20 09 22 44"
    d4 = by_name("I4G32").dequantize(raw4, (32,))
    assert d4[[0, 3, 16]].tolist() == [0.363525390625, 4.3623046875, -1.090576171875]
    d3 = by_name("I3G32").dequantize(raw3, (32,))
    assert d3[[0, 1, 3]].tolist() == [0.77880859375, 0.0, 4.6728515625]
    # 3-bit straddling: q = 0..7 repeated packs as 88 c6 fa per 8 elements
    raw = GW.pack_groupwise(np.arange(32) % 8, np.ones(1, np.float32), np.array([4]), 3, 32)
    assert raw.tobytes().hex() == "003c04" + "88c6fa" * 4


def test_pack_of_rtn_is_the_codec():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((7, 384)).astype(np.float32) * 0.05
    W[2] = 0.0
    W[3, :128] = 0.3  # constant positive group
    for name in TYPES:
        bits, group = bits_group(name)
        q, s, z = rtn_groupwise(W, bits, group, sym=False)
        np.testing.assert_array_equal(GW.pack_groupwise(q, s, z, bits, group), by_name(name).quantize(W))
        q, s, z = rtn_groupwise(W, bits, group, sym=True)  # symmetric results store too
        raw = GW.pack_groupwise(q, s, z, bits, group)
        np.testing.assert_array_equal(GW.unpack_groupwise(raw, bits, group, 384)[0], q)


@pytest.mark.parametrize("name", TYPES)
def test_quantize_error_bound(name):
    """RTN with an fp16 scale: within half a step, plus the clipping that rounding the scale
    to fp16 can add at the range ends: about maxq * delta steps, delta the relative rounding
    error of the scale (<= 2**-11 for normal halves, 2**-25 / scale for subnormal ones)."""
    bits, group = bits_group(name)
    maxq = (1 << bits) - 1
    rng = np.random.default_rng(bits + 7 * group)
    W = rng.standard_normal((16, 4 * group)).astype(np.float32)
    W *= (10.0 ** rng.uniform(-4, 3, size=(16, 1))).astype(np.float32)
    W[0] = 0.0
    W[1] = -2.5  # constant negative row
    W[2, :group] = np.abs(W[2, :group])  # an all-positive group
    bt = by_name(name)
    raw = bt.quantize(W)
    deq = bt.dequantize(raw, W.shape)
    _q, scale, zero = GW.unpack_groupwise(raw, bits, group, W.shape[1])
    step = np.repeat(scale.astype(np.float64), group, 1)
    err = np.abs(deq.astype(np.float64) - W)
    delta = np.maximum(2.0**-11, 2.0**-25 / step)
    assert np.all(err <= step * (0.5 + 1.1 * maxq * delta) + 1e-30)
    assert np.all(deq[0] == 0.0)
    np.testing.assert_allclose(deq[1], -2.5, rtol=0, atol=float(scale[1].max()) * 0.51)
    # zero is exactly representable: q == zero decodes to 0.0
    assert np.all((zero >= 0) & (zero <= maxq))
    # mean error is about a uniform quantisation error (step / sqrt(12))
    rel = err[3:] / step[3:]
    assert rel.mean() < 0.3


def test_rows_not_a_multiple_of_the_group():
    for name in TYPES:
        bits, group = bits_group(name)
        bt = by_name(name)
        with pytest.raises(QConvertError):
            bt.quantize(np.zeros((2, group + 16), np.float32))
        with pytest.raises(QConvertError):
            GW.pack_groupwise(np.zeros((2, group + 16), np.uint8), np.ones((2, 2)), np.zeros((2, 2)), bits, group)
        with pytest.raises(QConvertError):
            GW.unpack_groupwise(np.zeros((2, 2 * bt.type_size), np.uint8), bits, group, group + 16)
        raw = bt.quantize(np.ones((3, group), np.float32))
        with pytest.raises(QConvertError):
            K.linear(raw, name, np.ones(group + 16, np.float32))
    with pytest.raises(QConvertError):  # bytes that are not whole rows
        GW.unpack_groupwise(np.zeros((2, 19 * 2 + 1), np.uint8), 4, 32, 64)


def test_pack_rejects_bad_values():
    q = np.zeros((2, 64), np.uint8)
    s = np.ones((2, 2), np.float32)
    z = np.zeros((2, 2), np.int32)
    GW.pack_groupwise(q, s, z, 4, 32)
    with pytest.raises(QConvertError, match="q must be"):
        GW.pack_groupwise(q + 16, s, z, 4, 32)
    with pytest.raises(QConvertError, match="zeros"):
        GW.pack_groupwise(q, s, z + 16, 4, 32)
    with pytest.raises(QConvertError, match="zeros"):
        GW.pack_groupwise(q, s, z + 0.5, 4, 32)
    with pytest.raises(QConvertError, match="shape"):
        GW.pack_groupwise(q, s[:, :1], z, 4, 32)
    with pytest.raises(QConvertError, match="float16"):
        GW.pack_groupwise(q, s * np.float32(0.1), z, 4, 32)
    raw = GW.pack_groupwise(q, s * np.float32(0.1), z, 4, 32, round_scales=True)
    assert np.all(GW.unpack_groupwise(raw, 4, 32, 64)[1] == np.float32(np.float16(0.1)))
    with pytest.raises(QConvertError):
        GW.pack_groupwise(q, s, z, 5, 32)


# --- kernels ----------------------------------------------------------------------------


def _lim(n_in: int, T: int, scale: np.ndarray) -> np.ndarray:
    gemm = T >= K.SMALL_T
    k = n_in / _ir.GEMM_LANES + 8 if gemm else n_in / 64 + 16
    return (k + 4) * U * scale + 1e-30


def _check(y, y_ref, lim):
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    worst = float(np.max(err / lim))
    assert worst <= 1.0, f"error {err.max():.3g} exceeds the bound by {worst:.3g}x"


@pytest.mark.parametrize("name", TYPES)
def test_kernels_against_reference(name):
    bits, group = bits_group(name)
    rng = np.random.default_rng(17 * bits + group)
    for out_f in OUTS:
        for n in INS:
            raw = R.random_blocks(rng, name, out_f, n)
            ref_w = R.dequantize(raw, name, n)
            # dequant_rows: bit-identical to the reference and the codec
            codec = by_name(name).dequantize(raw, (out_f, n))
            np.testing.assert_array_equal(codec.view(np.uint32), ref_w.view(np.uint32))
            ids = np.arange(out_f)[::-1].copy()
            got = K.embedding_rows(raw, name, ids, n)
            np.testing.assert_array_equal(got.view(np.uint32), ref_w[ids].view(np.uint32))
            W64 = codec.astype(np.float64)  # dequantise-then-matmul in float64
            for T in TOKENS:
                X = rng.standard_normal((T, n)).astype(np.float32)
                scale = R.error_scale(raw, name, X)  # (T, out)
                lim = _lim(n, T, scale)
                if T == 1:
                    y = K.linear(raw, name, X[0])
                    assert y.shape == (out_f,) and y.dtype == np.float32
                    _check(y, R.matvec(raw, name, X[0]), lim[0])
                    _check(y, W64 @ X[0].astype(np.float64), lim[0])
                Y = K.linear(raw, name, X)
                assert Y.shape == (T, out_f) and Y.dtype == np.float32
                _check(Y, R.matmul(raw, name, X), lim)
                _check(Y, X.astype(np.float64) @ W64.T, lim)


@pytest.mark.parametrize("name", ["I4G128", "I3G32", "I2G64", "I8G32"])
def test_kernels_on_quantized_weights(name):
    """End to end: real-looking weights through the codec, kernels against float64."""
    bits, group = bits_group(name)
    rng = np.random.default_rng(99)
    W = rng.standard_normal((40, 1536)).astype(np.float32) * 0.02
    raw = by_name(name).quantize(W)
    Wd = by_name(name).dequantize(raw, W.shape).astype(np.float64)
    for T in (1, 5):
        X = rng.standard_normal((T, 1536)).astype(np.float32)
        Y = K.linear(raw, name, X)
        _check(Y, X.astype(np.float64) @ Wd.T, _lim(1536, T, np.abs(X.astype(np.float64)) @ np.abs(Wd).T))
    # the quantised product is close to the float one (a sanity check on the codec)
    x = rng.standard_normal(1536).astype(np.float32)
    y, y0 = K.linear(raw, name, x), W.astype(np.float64) @ x
    assert np.linalg.norm(y - y0) / np.linalg.norm(y0) < {2: 0.8, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_kernels_read_only_and_memmap(tmp_path):
    rng = np.random.default_rng(3)
    raw = R.random_blocks(rng, "I3G128", 9, 384)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    x = rng.standard_normal(384).astype(np.float32)
    np.testing.assert_array_equal(K.linear(mm, "I3G128", x), K.linear(raw, "I3G128", x))
    np.testing.assert_array_equal(
        K.embedding_rows(mm, "I3G128", [8, 0], 384), R.dequantize(raw, "I3G128", 384)[[8, 0]]
    )
