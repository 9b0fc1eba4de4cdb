"""NF4 and NF4_DQ (qconvert/blocks/nf4.py, qconvert/runtime/kernels/nf4.py).

Against bitsandbytes (0.50.2, CPU): ``quantize_4bit(x, blocksize=64, quant_type="nf4",
compress_statistics=False/True)`` -> ``dequantize_4bit``. Our bytes hold bitsandbytes'
packed codes exactly and decode to its values bit for bit. With double quantization,
bitsandbytes' ``offset`` is torch's float32 ``mean()`` of the block absmax, whose last bit
depends on the CPU's vector width and thread count; qconvert pins it as the correctly summed
mean rounded to float32. Given bitsandbytes' offset (``quantize_nf4_dq(offset=...)``) every
byte and value matches; with our own offset, bitsandbytes' decoder reads our state to
exactly our values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qconvert.blocks import by_name
from qconvert.blocks import nf4 as B
from qconvert.errors import QConvertError
from qconvert.runtime import kernels as K
from qconvert.runtime.kernels import nf4 as KN

SHAPES_BNB = [(3, 4096), (1536, 576), (5, 64), (2, 64 * 300)]  # 576 = 9 * 64 (SmolLM2); 600 blocks: 3 DQ groups
U = 2.0**-24


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(4096)


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional and torch, or a skip saying why they cannot run here."""
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    try:
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import torch
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.zeros(64), blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"bitsandbytes cannot run here: {type(e).__name__}: {e}")
    return F, torch


def weights(rng, shape) -> np.ndarray:
    """Normal weights at per-row scales over 4 decades, plus special blocks: all zero,
    subnormal, values exactly on the NF4 decision midpoints (ties go to the lower code) and
    one step either side of them, a block of equal values."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= (10.0 ** rng.uniform(-3, 1, size=(shape[0], 1))).astype(np.float32)
    flat = x.reshape(-1, 64)
    if flat.shape[0] >= 6:
        flat[0] = 0.0
        flat[1] = (rng.standard_normal(64) * 1e-40).astype(np.float32)  # subnormal
        for k, direction in ((2, None), (3, 2.0), (4, -2.0)):
            b = B.NF4_BOUNDS if direction is None else np.nextafter(B.NF4_BOUNDS, np.float32(direction))
            flat[k] = 0.0
            flat[k, 0] = 1.0  # absmax 1: s = x exactly
            flat[k, 1:16] = b
            flat[k, 16:31] = -b
        flat[5] = 0.375
    return x


def _codes(raw: np.ndarray, name: str) -> np.ndarray:
    size, off = {"NF4": (36, 4), "NF4_DQ": (33, 1)}[name]
    return raw.reshape(-1, size)[:, off:].reshape(-1)


# ---------------------------------------------------------------------------------------
# against bitsandbytes


def test_tables_are_bitsandbytes(bnb):
    F, _torch = bnb
    assert np.array_equal(_bits(B.NF4_VALUES), _bits(F.get_4bit_type("nf4", device="cpu").numpy()))
    assert np.array_equal(_bits(B.DYNAMIC_CODE), _bits(F.create_dynamic_map().numpy()))


@pytest.mark.parametrize("shape", SHAPES_BNB, ids=lambda s: "x".join(map(str, s)))
def test_nf4_bit_identical_to_bitsandbytes(bnb, rng, shape):
    F, torch = bnb
    x = weights(rng, shape)
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=False)
    want = F.dequantize_4bit(packed, state).numpy()

    raw = by_name("NF4").quantize(x)
    assert raw.shape == (shape[0], shape[1] // 64 * 36)
    assert np.array_equal(_codes(raw, "NF4"), packed.numpy().reshape(-1))
    assert np.array_equal(_bits(raw.reshape(-1, 36)[:, :4].copy().view("<f4").reshape(-1)), _bits(state.absmax.numpy()))
    assert np.array_equal(_bits(by_name("NF4").dequantize(raw, shape)), _bits(want))


@pytest.mark.parametrize("shape", SHAPES_BNB, ids=lambda s: "x".join(map(str, s)))
def test_nf4_dq_bit_identical_to_bitsandbytes(bnb, rng, shape):
    F, torch = bnb
    bt = by_name("NF4_DQ")
    x = weights(rng, shape)
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    want = F.dequantize_4bit(packed, state).numpy()
    bnb_offset = float(state.offset)

    # 1. with bitsandbytes' offset: the same bytes, the same state, the same values
    raw, params = B.quantize_nf4_dq(x, offset=bnb_offset)
    blocks = raw.reshape(-1, 33)
    assert np.array_equal(blocks[:, 1:].reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(blocks[:, 0], state.absmax.numpy())
    assert np.array_equal(_bits(params["dq_absmax2"]), _bits(state.state2.absmax.numpy()))
    assert np.float32(params["dq_offset"]) == np.float32(bnb_offset)
    assert params["dq_block"] == 256 == state.state2.blocksize
    assert np.array_equal(_bits(bt.dequantize(raw, shape, params)), _bits(want))

    # 2. with our own offset (the correctly summed mean): bitsandbytes decodes our state to our values
    raw2, params2 = bt.quantize_with_params(x)
    n_blocks = raw2.size // 33
    ours_absmax = by_name("NF4").quantize(x).reshape(-1, 36)[:, :4].copy().view("<f4").reshape(-1)
    assert np.float32(params2["dq_offset"]) == np.float32(math.fsum(ours_absmax.astype(np.float64).tolist()) / n_blocks)
    # torch's float32 mean is within a few ulp of the exact mean
    assert abs(params2["dq_offset"] - bnb_offset) <= 8 * np.spacing(np.float32(bnb_offset))
    state.absmax = torch.from_numpy(raw2.reshape(-1, 33)[:, 0].copy())
    state.offset = torch.tensor(np.float32(params2["dq_offset"]))
    state.state2.absmax = torch.from_numpy(np.array(params2["dq_absmax2"], dtype=np.float32))
    codes2 = torch.from_numpy(raw2.reshape(-1, 33)[:, 1:].copy().reshape(-1, 1))
    assert np.array_equal(codes2.numpy(), packed.numpy())
    theirs = F.dequantize_4bit(codes2, state).numpy()
    assert np.array_equal(_bits(bt.dequantize(raw2, shape, params2)), _bits(theirs))


def test_dq_groups_span_rows(bnb, rng):
    """Double-quantization groups of 256 blocks run over the flattened tensor, across rows
    (here 9 blocks per row), as bitsandbytes counts them."""
    F, torch = bnb
    x = weights(rng, (100, 576))  # 900 blocks: groups end mid-row
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    raw, params = B.quantize_nf4_dq(x, offset=float(state.offset))
    assert len(params["dq_absmax2"]) == 4
    rows = K.embedding_rows(raw, "NF4_DQ", np.arange(100), 576, aux=K.prepare_aux("NF4_DQ", params, x.shape))
    assert np.array_equal(_bits(rows), _bits(F.dequantize_4bit(packed, state).numpy()))


# ---------------------------------------------------------------------------------------
# codec rules without bitsandbytes


def test_code_kernel_equals_plain_rule(rng):
    x = weights(rng, (64, 640)).reshape(-1, 64)
    q1, a1 = B._nf4_codes(x)
    q2, a2 = B._nf4_codes_numpy(x)
    assert np.array_equal(q1, q2) and np.array_equal(_bits(a1), _bits(a2))


def test_ties_take_the_lower_code():
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = 1.0
    x[0, 1:16] = B.NF4_BOUNDS
    qs, absmax = B._nf4_codes(x)
    q = np.stack([qs >> 4, qs & 15], axis=-1).reshape(-1)
    assert absmax[0] == 1.0 and q[0] == 15
    assert list(q[1:16]) == list(range(15))  # bound k lies between codes k and k+1: k wins


def test_zero_and_constant_tensors():
    for bt in (by_name("NF4"), by_name("NF4_DQ")):
        for value in (0.0, 0.5):
            x = np.full((2, 128), value, np.float32)
            raw, params = bt.quantize_with_params(x)
            assert np.array_equal(bt.dequantize(raw, x.shape, params), x), (bt.name, value)


def test_params_json_round_trip(rng):
    vals = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * np.float32(0.03),
            np.abs(rng.standard_normal(2000)).astype(np.float32) * (10.0 ** rng.uniform(-40, 38, 2000)).astype(np.float32),
            np.array([0.0, 1e-45, 1.1754944e-38, 3.4028235e38, 0.1, 1 / 3], np.float32),
        ]
    ).astype(np.float32)
    vals = vals[np.isfinite(vals)]
    back = np.array(json.loads(json.dumps([B.json_f32(v) for v in vals])), dtype=np.float64).astype(np.float32)
    assert np.array_equal(_bits(back), _bits(vals))
    # short decimals where they read back exactly
    assert json.dumps(B.json_f32(np.float32(0.1))) == "0.1"


@pytest.mark.parametrize("shape", [(1, 64), (3, 4096), (1536, 576), (2, 64 * 300)])
def test_params_fit_the_reserved_length(rng, shape):
    from qconvert.container.writer import canonical_json

    bt = by_name("NF4_DQ")
    # params_max_len allows 24 characters a number: no float32 value needs more than 23
    vals = (np.abs(rng.standard_normal(5000)) * (10.0 ** rng.uniform(-45, 38, 5000))).astype(np.float32)
    vals = vals[np.isfinite(vals)]
    assert max(len(json.dumps(B.json_f32(v))) for v in vals) <= 23
    _raw, params = bt.quantize_with_params(weights(rng, shape))
    assert len(canonical_json(params)) <= bt.params_max_len(shape)
    assert len(params["dq_absmax2"]) == -(-(shape[0] * shape[1] // 64) // 256)


def test_row_length_must_be_a_multiple_of_64():
    for name in ("NF4", "NF4_DQ"):
        bt = by_name(name)
        assert bt.can_hold((4, 576)) and not bt.can_hold((4, 100)) and not bt.can_hold((4, 32))
        with pytest.raises(QConvertError, match="multiple of 64"):
            bt.quantize_with_params(np.zeros((2, 96), np.float32))
        with pytest.raises(QConvertError, match="multiple of 64"):
            bt.row_bytes(96)
    with pytest.raises(QConvertError, match="multiple of 64"):
        B.quantize_nf4_dq(np.zeros((2, 96), np.float32))


def test_bits_per_weight():
    nf4, dq = by_name("NF4"), by_name("NF4_DQ")
    assert (nf4.id, nf4.block_size, nf4.type_size, nf4.bits_per_weight, nf4.ggml) == (256, 64, 36, 4.5, False)
    assert (dq.id, dq.block_size, dq.type_size, dq.bits_per_weight, dq.ggml) == (257, 64, 33, 4.125, False)
    assert not nf4.has_params and dq.has_params
    shape = (1536, 576)
    _raw, params = dq.quantize_with_params(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    n = shape[0] * shape[1]
    # data bytes + side data counted as binary f32: 8*33/64 + 32/(64*256) (+ the offset)
    bpw = (8 * dq.nbytes(shape) + dq.params_bits(params)) / n
    assert round(bpw, 3) == 4.127
    assert abs(bpw - (8 * 33 / 64 + 32 / (64 * 256))) < 1e-4


def test_nf4_dq_needs_its_params(rng):
    bt = by_name("NF4_DQ")
    x = weights(rng, (4, 128))
    with pytest.raises(QConvertError, match="quantize_with_params"):
        bt.quantize(x)
    raw, params = bt.quantize_with_params(x)
    with pytest.raises(QConvertError, match="params"):
        bt.dequantize(raw, x.shape)
    bad = dict(params, dq_absmax2=params["dq_absmax2"] + [1.0])
    with pytest.raises(QConvertError, match="dq_absmax2"):
        bt.dequantize(raw, x.shape, bad)
    with pytest.raises(QConvertError, match="dq_block"):
        bt.dequantize(raw, x.shape, dict(params, dq_block=128))
    with pytest.raises(QConvertError, match="params"):
        K.linear(raw, "NF4_DQ", np.zeros(128, np.float32))
    with pytest.raises(QConvertError, match="blocks"):
        K.linear(raw[:2], "NF4_DQ", np.zeros(128, np.float32), aux=K.prepare_aux("NF4_DQ", params, x.shape))
    # types without params ignore them
    raw4 = by_name("NF4").quantize(x)
    assert np.array_equal(by_name("NF4").dequantize(raw4, x.shape, {"x": 1}), by_name("NF4").dequantize(raw4, x.shape))
    assert K.prepare_aux("NF4", {}, x.shape) is None


def test_container_round_trip(tmp_path, rng):
    """Params travel through the container's tensor entry; Container.tensor, Linear and
    Embedding decode with them."""
    from qconvert.container import Container, ContainerWriter, TensorSpec
    from qconvert.runtime.weights import Weights

    W = weights(rng, (96, 576))
    E = weights(rng, (50, 128))
    raw_w, pw = by_name("NF4_DQ").quantize_with_params(W)
    raw_e, pe = by_name("NF4_DQ").quantize_with_params(E)
    raw_n = by_name("NF4").quantize(W)
    specs = [
        TensorSpec("w", W.shape, "NF4_DQ", extra=pw),
        TensorSpec("e", E.shape, "NF4_DQ", extra=pe),
        TensorSpec("n", W.shape, "NF4"),
    ]
    path = tmp_path / "m.q"
    with ContainerWriter(path, {"k": 1}, specs) as w:
        w.write("w", raw_w)
        w.write("e", raw_e)
        w.write("n", raw_n)
    c = Container(path)
    try:
        assert c.tensors["w"].extra == pw
        want_w = by_name("NF4_DQ").dequantize(raw_w, W.shape, pw)
        assert np.array_equal(_bits(c.tensor("w")), _bits(want_w))
        assert np.array_equal(_bits(c.tensor("n")), _bits(by_name("NF4").dequantize(raw_n, W.shape)))
        wts = Weights(c)
        x = rng.standard_normal(576).astype(np.float32)
        ref = want_w.astype(np.float64) @ x
        assert np.allclose(wts.linear("w")(x), ref, rtol=0, atol=1e-4 * np.abs(want_w).sum(1).max())
        emb = wts.embedding("e")
        want_e = by_name("NF4_DQ").dequantize(raw_e, E.shape, pe)
        assert np.array_equal(_bits(emb(np.array([7, 0, 49]))), _bits(want_e[[7, 0, 49]]))
        X = rng.standard_normal((4, 128)).astype(np.float32)
        tied = emb.as_linear()(X)
        assert np.allclose(tied, X.astype(np.float64) @ want_e.astype(np.float64).T, rtol=0, atol=1e-4)
    finally:
        c.close()


def test_writer_reserves_params_until_written(tmp_path, rng):
    """One pass: the params of an NF4_DQ tensor are known only once it is quantized, so the
    writer reserves BlockType.params_max_len bytes of header for them (the unused rest stays
    zero before data_offset, FORMAT.md §2) and takes them with the tensor's bytes."""
    from qconvert.container import Container, ContainerWriter, TensorSpec

    if "extra_reserve" not in getattr(TensorSpec, "__dataclass_fields__", {}):
        pytest.skip("ContainerWriter has no TensorSpec.extra_reserve / write(extra=) yet")
    bt = by_name("NF4_DQ")
    W = weights(rng, (600, 576))  # 5400 blocks: 22 DQ groups
    v = rng.standard_normal(576).astype(np.float32)
    specs = [
        TensorSpec("w", W.shape, "NF4_DQ", extra_reserve=bt.params_max_len(W.shape)),
        TensorSpec("v", v.shape, "F32"),
    ]
    path = tmp_path / "m.q"
    with ContainerWriter(path, {"k": 1}, specs) as w:
        raw, params = bt.quantize_with_params(W)
        w.write("w", raw, extra=params)
        w.write("v", by_name("F32").quantize(v))
    c = Container(path)
    try:
        assert c.tensors["w"].extra == params and c.verify() == []
        assert np.array_equal(_bits(c.tensor("w")), _bits(bt.dequantize(raw, W.shape, params)))
        assert np.array_equal(c.tensor("v"), v)
        assert c.data_offset % 64 == 0
    finally:
        c.close()
    with pytest.raises(QConvertError, match="reserved"):
        with ContainerWriter(tmp_path / "small.q", {}, [TensorSpec("w", W.shape, "NF4_DQ", extra_reserve=10)]) as w:
            w.write("w", raw, extra=params)


# ---------------------------------------------------------------------------------------
# kernels


KSHAPES = [(1, 64), (3, 64), (37, 128), (5, 4096), (64, 576), (45, 64)]


def _packed(name, W):
    raw, params = by_name(name).quantize_with_params(W)
    return raw, params, K.prepare_aux(name, params, W.shape)


def _assert_close(y, y_ref, scale, n_in):
    lim = (n_in / 16 + 32) * U * scale + 1e-30
    worst = np.max(np.abs(np.asarray(y, np.float64) - y_ref) / lim)
    assert worst <= 1.0, f"error exceeds the bound by {worst:.3g}x"


@pytest.mark.parametrize("name", ["NF4", "NF4_DQ"])
def test_kernels_match_reference(name, rng):
    for out_f, in_f in KSHAPES:
        W = weights(rng, (out_f, in_f))
        raw, params, aux = _packed(name, W)
        # the reference decoder (from the layout) equals the codec, bit for bit
        codec = by_name(name).dequantize(raw, W.shape, params)
        assert np.array_equal(_bits(KN.reference_dequantize(raw, name, in_f, params)), _bits(codec))
        # dequant_rows (embeddings, batched tiles) too, in any order
        ids = rng.integers(0, out_f, size=2 * out_f)
        assert np.array_equal(_bits(K.embedding_rows(raw, name, ids, in_f, aux=aux)), _bits(codec[ids]))
        for T in (None, 1, 2, 3, 7, 13):  # None: x (in,); 1, 2: matvec per token; 3+: tiled GEMM
            X = rng.standard_normal(in_f if T is None else (T, in_f)).astype(np.float32)
            Y = K.linear(raw, name, X, aux=aux)
            assert Y.shape == ((out_f,) if T is None else (T, out_f)) and Y.dtype == np.float32
            _assert_close(Y, KN.reference_matvec(raw, name, X, params), KN.reference_error_scale(raw, name, X, params), in_f)


@pytest.mark.parametrize("mode", sorted(KN.LOOKUPS))
def test_table_lookups(mode):
    """Every lookup implementation the host can run maps 0..15 to the NF4 values exactly."""
    from numba import njit

    from qconvert.runtime.kernels import _ir

    need = {"avx512": "avx512f", "avx2": "avx2"}.get(mode)
    if need and not _ir._host_has(need):
        pytest.skip(f"this CPU lacks {need}")
    probe = KN.make_lookup_probe(mode)

    @njit
    def run(idx, out):
        probe(idx, out)

    out = np.empty(16, np.float32)
    for idx in (np.arange(16, dtype=np.int32), np.arange(16, dtype=np.int32)[::-1].copy()):
        run(idx, out)
        assert np.array_equal(_bits(out), _bits(B.NF4_VALUES[idx]))


def test_every_nf4_type_has_kernels():
    for name in ("NF4", "NF4_DQ"):
        k = K.get_kernel(name)
        bt = by_name(name)
        assert (k.block_size, k.type_size) == (bt.block_size, bt.type_size)
    assert K.get_kernel("NF4").prepare is None and K.get_kernel("NF4_DQ").prepare is not None
