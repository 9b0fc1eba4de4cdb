"""Our block codecs against gguf-py 0.19 (itself bit-exact with llama.cpp's reference C code).

Bytes must be identical and dequantized values must be identical (np.array_equal), on
inputs chosen to hit the corners of each quantizer: zero blocks, constant blocks, huge
outliers, magnitudes near the float16 limit, tiny (denormal-in-f16) values, ties in |max|.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf import quants as gquants  # noqa: E402

from qconvert.blocks import all_types, by_name  # noqa: E402
from qconvert.errors import QConvertError  # noqa: E402

COMPARED = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
SHAPES = [(7, 64), (3, 4096), (1, 32)]


def _gaussian(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _outliers(rng, shape):
    x = _gaussian(rng, shape)
    x[rng.random(shape) < 0.02] *= 1000
    return x


def _zero_rows(rng, shape):
    x = _gaussian(rng, shape)
    x[::2] = 0
    return x


def _constant_rows(rng, shape):
    x = _gaussian(rng, shape)
    for i in range(shape[0]):
        x[i] = np.float32(rng.choice([3.25, -0.7, 1e-3, -42.0]))
    return x


def _extremes(rng, shape):
    """Mixed ±60000 (near f16 max 65504) with ordinary values; equal-|max| ties of both signs."""
    vals = np.array([60000.0, -60000.0, 65504.0, -65504.0, 0.0, 1.5, -3.0], dtype=np.float32)
    return rng.choice(vals, size=shape).astype(np.float32)


def _negative_max(rng, shape):
    """The largest magnitude in every block is negative."""
    x = np.abs(_gaussian(rng, shape))
    x[..., ::32] = -10.0
    x[..., 5::32] *= -1
    return x


def _tiny(rng, shape):
    return (rng.standard_normal(shape) * 1e-8).astype(np.float32)


def _small_ints(rng, shape):
    """Many exact halves after scaling: exercises the rounding-mode tie cases."""
    return (rng.integers(-254, 255, size=shape) / 2).astype(np.float32)


def _rounding_traps(rng, shape):
    """Blocks whose scale is exactly 1 (|max| = 127, so Q8_0 has d = id = 1), holding exact halves
    and their float32 neighbours: 0.49999997 + 0.5 rounds up to 1.0 in float32, so a
    floor(|v| + 0.5) "roundf" is wrong there; ties must go away from zero."""
    below = lambda v: float(np.nextafter(np.float32(v), np.float32(0)))  # noqa: E731
    pattern = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, below(0.5), -below(0.5), below(1.5), -below(1.5)]
    pattern += [below(126.5), 3.5, -3.5, 0.0, -0.0]
    block = np.resize(np.array(pattern, dtype=np.float32), 32)
    x = np.resize(block, shape).astype(np.float32)
    return x * rng.choice(np.array([1.0, -1.0], dtype=np.float32), size=(shape[0], 1))


GENERATORS = [_rounding_traps, _gaussian, _outliers, _zero_rows, _constant_rows, _extremes, _negative_max, _tiny, _small_ints]


def _gguf_bytes(x: np.ndarray, name: str) -> np.ndarray:
    ref = gquants.quantize(x, GGMLQuantizationType[name])
    return np.ascontiguousarray(ref).view(np.uint8).reshape(x.shape[0], -1)


@pytest.mark.parametrize("name", COMPARED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__.strip("_"))
def test_matches_gguf(name, shape, gen):
    bt = by_name(name)
    seed = 1000 * GENERATORS.index(gen) + SHAPES.index(shape)
    x = gen(np.random.default_rng(seed), shape)

    ours = bt.quantize(x)
    ref = _gguf_bytes(x, name)
    assert ours.shape == ref.shape
    mismatch = np.argwhere(ours != ref)
    assert mismatch.size == 0, f"{name}: first differing byte at {mismatch[0].tolist()}"

    deq = bt.dequantize(ours, x.shape)
    ref_deq = gquants.dequantize(ref, GGMLQuantizationType[name]).reshape(x.shape)
    assert deq.dtype == np.float32
    assert np.array_equal(deq, ref_deq)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_float_specials_match_gguf(name):
    bits = np.array(
        [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF,  # NaNs (quiet, signalling)
         0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # ±inf, ±0
         0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,  # f32 denormals, ±f32 max
         0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF],  # bf16 ties and near-ties
        dtype=np.uint32,
    )
    x = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ours = by_name(name).quantize(x)
        ref = _gguf_bytes(x.reshape(1, -1), name)
        assert np.array_equal(ours.reshape(-1), ref.reshape(-1))
        deq = by_name(name).dequantize(ours, x.shape)
        ref_deq = gquants.dequantize(ref, GGMLQuantizationType[name]).reshape(x.shape)
    assert np.array_equal(deq, ref_deq, equal_nan=True)
    assert np.array_equal(np.isnan(deq), np.isnan(x))


def test_f32_is_identity():
    x = _outliers(np.random.default_rng(7), (3, 64))
    bt = by_name("F32")
    raw = bt.quantize(x)
    assert raw.tobytes() == x.astype("<f4").tobytes()
    assert np.array_equal(bt.dequantize(raw, x.shape), x)


# --- round-trip error bounds ------------------------------------------------------------------

EPS = 1e-3  # relative slack for the f16 rounding of d/m and float32 arithmetic


def _blocks(x):
    return x.reshape(-1, 32).astype(np.float64)


@pytest.mark.parametrize("gen", [_gaussian, _outliers, _small_ints], ids=lambda g: g.__name__.strip("_"))
def test_q8_0_error_bound(gen):
    x = gen(np.random.default_rng(11), (16, 1024))
    y = by_name("Q8_0").dequantize(by_name("Q8_0").quantize(x), x.shape)
    err = np.abs(_blocks(y) - _blocks(x)).max(axis=1)
    amax = np.abs(_blocks(x)).max(axis=1)
    # q = round(x/d) with d = amax/127 -> |x - q*d| <= d/2; storing d as f16 adds <= 127*|d - f16(d)|
    assert np.all(err <= amax / 127 / 2 * (1 + EPS) + amax * 2.0**-11 * (1 + EPS))


@pytest.mark.parametrize("name,levels", [("Q4_1", 15), ("Q5_1", 31)])
def test_affine_error_bound(name, levels):
    x = _gaussian(np.random.default_rng(12), (16, 1024))
    bt = by_name(name)
    y = bt.dequantize(bt.quantize(x), x.shape)
    b = _blocks(x)
    span = b.max(axis=1) - b.min(axis=1)
    err = np.abs(_blocks(y) - b).max(axis=1)
    # half a step, plus f16 rounding of d (times up to `levels`) and of m
    bound = span / levels / 2 + span * 2.0**-11 + np.abs(b.min(axis=1)) * 2.0**-11
    assert np.all(err <= bound * (1 + EPS))


@pytest.mark.parametrize("name,half", [("Q4_0", 8), ("Q5_0", 16)])
def test_symmetric_error_bound(name, half):
    x = _gaussian(np.random.default_rng(13), (16, 1024))
    bt = by_name(name)
    y = bt.dequantize(bt.quantize(x), x.shape)
    b = _blocks(x)
    amax = np.abs(b).max(axis=1)
    err = np.abs(_blocks(y) - b).max(axis=1)
    # step d = amax/half; the positive side clips at (half-1)*d, so the worst case is one step
    assert np.all(err <= amax / half * (1 + EPS) + amax * 2.0**-11 * 2)


def test_zero_block_round_trips_to_zero():
    x = np.zeros((2, 256), dtype=np.float32)  # a row every block size divides (up to K-quants' 256)
    for bt in all_types():
        if bt.quantize_blocks is None and bt.quantize_rows is None and bt.quantize_tensor is None:
            continue  # read-only types
        raw, params = bt.quantize_with_params(x)  # params: types whose tensors carry them (FORMAT.md §4)
        assert np.array_equal(bt.dequantize(raw, x.shape, params), x), bt.name


# --- shapes and the registry -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_row_length_not_multiple_of_block(name):
    bt = by_name(name)
    assert not bt.can_hold((4, 33))
    assert bt.can_hold((4, 64))
    with pytest.raises(QConvertError):
        bt.row_bytes(33)
    with pytest.raises(QConvertError):
        bt.quantize(np.zeros((2, 48), dtype=np.float32))


def test_sizes_match_gguf():
    checked = 0
    for bt in all_types():
        if not bt.ggml:
            continue
        qtype = GGMLQuantizationType(bt.id)
        assert qtype.name == bt.name
        assert GGML_QUANT_SIZES[qtype] == (bt.block_size, bt.type_size), bt.name
        checked += 1
    assert checked >= 8


def test_every_compared_type_is_registered():
    names = {bt.name for bt in all_types()}
    assert set(COMPARED) | {"F32"} <= names
