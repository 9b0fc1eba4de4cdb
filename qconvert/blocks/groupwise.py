"""Group-wise integer blocks: the storage of GPTQ / AWQ / RTN group-wise results.

One block type per (bits, group), bits in {2, 3, 4, 8}, group in {32, 64, 128}, named
``I{bits}G{group}`` (e.g. ``I4G128``), id ``300 + 10 * bits + {32: 0, 64: 1, 128: 2}[group]``
(I4G128 = 342). One block is one group of ``group`` consecutive elements of one row:

    offset 0  scale  f16   (2 bytes)
    offset 2  zero   u8    (1 byte, the integer zero point; writers store 0 .. 2**bits - 1)
    offset 3  qs     bits * group / 8 bytes: element i at bit offset i * bits of qs,
              least significant bit first, bytes little-endian (a 3-bit element may
              straddle two bytes)

    type_size = 3 + bits * group / 8        (I4G128: 67 bytes, 4.1875 bits per weight)

Decode: ``x[i] = f32(q[i] - zero) * f32(scale)``, one float32 multiplication. ``q - zero`` is
a small integer and ``scale`` an f16, so the product is exact in float32 (<= 9 + 11
significant bits): every correct decoder returns the same bits.

Quantize (``quantize_blocks``: plain round-to-nearest, asymmetric, per block; the rule of
:func:`qconvert.blocks.grid.fit_params` with ``sym=False``, all arithmetic float64,
``rint`` = round half to even):

    maxq  = 2**bits - 1
    xmin  = min(min_i x[i], 0);  xmax = max(max_i x[i], 0)     # 0 is always representable
    if xmin == xmax == 0: xmin, xmax = -1, 1
    scale = f16(clamp((xmax - xmin) / maxq, 2**-24, 65504))     # nearest f16, ties to even
    zero  = clamp(rint(-xmin / scale), 0, maxq)
    q[i]  = clamp(rint(x[i] / scale) + zero, 0, maxq)

GPTQ and AWQ choose q, scale and zero themselves; :func:`pack_groupwise` stores their result
and :func:`unpack_groupwise` gives it back (also the way to convert GPTQ/AWQ checkpoints).
Act-order permutations are not part of the type: a permuted layer stores ``W[:, perm]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import QConvertError
from .grid import fit_params, quantize
from .registry import BlockType, by_name, register

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
_GROUP_CODE = {32: 0, 64: 1, 128: 2}
_F16 = np.dtype("<f2")
_CHUNK_ELEMS = 1 << 20  # elements per pass when packing / quantizing (bounded temporaries)


def type_name(bits: int, group: int) -> str:
    """``I{bits}G{group}``; QConvertError when the pair has no block type."""
    if bits not in BITS or group not in GROUPS:
        raise QConvertError(
            f"no group-wise block type for {bits} bits and groups of {group}: "
            f"bits must be one of {list(BITS)}, group one of {list(GROUPS)}"
        )
    return f"I{bits}G{group}"


def type_id(bits: int, group: int) -> int:
    type_name(bits, group)
    return 300 + 10 * bits + _GROUP_CODE[group]


def type_size(bits: int, group: int) -> int:
    type_name(bits, group)
    return 3 + bits * group // 8


def groupwise_type(bits: int, group: int) -> BlockType:
    """The registered block type storing ``bits``-bit integers in groups of ``group``."""
    return by_name(type_name(bits, group))


def parse_type(name: str) -> tuple[int, int] | None:
    """``"I4G128"`` -> (4, 128); None for names outside the family."""
    name = name.upper()
    for bits in BITS:
        for group in GROUPS:
            if name == f"I{bits}G{group}":
                return bits, group
    return None


# --- bit packing ------------------------------------------------------------------------


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integers 0 .. 2**bits - 1 (n a multiple of 8) -> (..., n * bits / 8) bytes:
    element i at bit offset i * bits, LSB first. Each 8 elements make one ``bits``-byte unit:
    the u64 sum of q[k] << (bits * k), whose low ``bits`` bytes (little-endian) are stored."""
    lead, n = q.shape[:-1], q.shape[-1]
    if bits == 8:
        return q.astype(np.uint8)
    units = q.reshape(-1, 8).astype(np.uint64)
    w = np.zeros(units.shape[0], np.uint64)
    for k in range(8):
        w |= units[:, k] << np.uint64(bits * k)
    b = w.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(b).reshape(*lead, n * bits // 8)


def _unpack_bits(qs: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits`: (..., n * bits / 8) bytes -> (..., n) uint8."""
    lead = qs.shape[:-1]
    if bits == 8:
        return np.array(qs, dtype=np.uint8).reshape(*lead, n)
    units = np.zeros((qs.size // bits, 8), np.uint8)
    units[:, :bits] = qs.reshape(-1, bits)
    w = units.view("<u8").reshape(-1, 1).astype(np.uint64)
    q = (w >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return q.astype(np.uint8).reshape(*lead, n)


# --- the codec --------------------------------------------------------------------------


def _encode(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """(n, group) q, (n,) fp16-exact scale, (n,) integer zero -> (n, type_size) bytes."""
    n, group = q.shape
    out = np.empty((n, 3 + bits * group // 8), np.uint8)
    out[:, 0:2] = np.asarray(scale, np.float64).astype(_F16).reshape(n, 1).view(np.uint8)
    out[:, 2] = np.asarray(zero).astype(np.uint8)
    out[:, 3:] = _pack_bits(q, bits)
    return out


def _decode_parts(blocks: np.ndarray, bits: int, group: int):
    """(n, type_size) bytes -> (q (n, group) uint8, scale (n,) float32, zero (n,) uint8)."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    scale = blocks[:, 0:2].copy().view(_F16).astype(np.float32).reshape(-1)
    zero = blocks[:, 2].copy()
    q = _unpack_bits(blocks[:, 3:], bits, group)
    return q, scale, zero


def _make_codec(bits: int, group: int):
    maxq = (1 << bits) - 1
    chunk = max(1, _CHUNK_ELEMS // group)

    def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.float32)
        out = np.empty((blocks.shape[0], 3 + bits * group // 8), np.uint8)
        for s in range(0, blocks.shape[0], chunk):
            x = blocks[s : s + chunk]
            scale, zero = fit_params(x, bits, sym=False)
            q = quantize(x, scale[:, None], zero[:, None], maxq).astype(np.uint8)
            out[s : s + chunk] = _encode(q, scale, zero, bits)
        return out

    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks, dtype=np.uint8)
        out = np.empty((blocks.shape[0], group), np.float32)
        for s in range(0, blocks.shape[0], chunk):
            q, scale, zero = _decode_parts(blocks[s : s + chunk], bits, group)
            c = q.astype(np.int16) - zero.astype(np.int16)[:, None]
            out[s : s + chunk] = c.astype(np.float32) * scale[:, None]
        return out

    quantize_blocks.__name__ = f"quantize_blocks_i{bits}g{group}"
    dequantize_blocks.__name__ = f"dequantize_blocks_i{bits}g{group}"
    return quantize_blocks, dequantize_blocks


# --- GPTQ / AWQ results <-> bytes -------------------------------------------------------


def _check_shape(in_features: int, group: int, what: str) -> int:
    if in_features <= 0 or in_features % group:
        raise QConvertError(
            f"{what}: rows of {in_features} elements cannot be stored in groups of {group}; "
            f"the row length must be a positive multiple of the group size"
        )
    return in_features // group


def pack_groupwise(
    q: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    bits: int,
    group: int,
    *,
    round_scales: bool = False,
) -> np.ndarray:
    """Group-wise integers -> the bytes of block type ``I{bits}G{group}``.

    q: (out, in) integers in 0 .. 2**bits - 1, in a multiple of ``group``;
    scales: (out, in / group) floats (float16, or float32/float64 holding float16 values);
    zeros: (out, in / group) integers (any integer or float dtype holding integers) in
    0 .. 2**bits - 1. Element (r, c) is ``(q[r, c] - zeros[r, c // group]) * scales[r, c // group]``
    (the convention of :mod:`qconvert.blocks.grid`).

    A scale that float16 cannot hold exactly is a QConvertError unless ``round_scales`` is
    True (then it is rounded to the nearest float16, which changes the weights slightly).
    Returns (out, row_bytes) uint8 (row_bytes = in / group * type_size), as
    ``BlockType.quantize`` would; a 1-D q is treated as one row.
    """
    name = type_name(bits, group)
    maxq = (1 << bits) - 1
    q = np.asarray(q)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise QConvertError(f"pack_groupwise: q must be (out, in), got shape {q.shape}")
    out_f, in_f = q.shape
    ng = _check_shape(in_f, group, f"{name}")
    scales = np.asarray(scales)
    zeros = np.asarray(zeros)
    scales = scales.reshape(out_f, -1) if scales.size == out_f * ng else scales
    zeros = zeros.reshape(out_f, -1) if zeros.size == out_f * ng else zeros
    for arr, what in ((scales, "scales"), (zeros, "zeros")):
        if arr.shape != (out_f, ng):
            raise QConvertError(f"pack_groupwise: {what} must have shape {(out_f, ng)}, got {arr.shape}")
    if not (np.issubdtype(q.dtype, np.integer) or np.issubdtype(q.dtype, np.floating)):
        raise QConvertError(f"pack_groupwise: q must hold integers, got dtype {q.dtype}")
    if q.size and (q.min() < 0 or q.max() > maxq or (q.dtype.kind == "f" and np.any(q != np.rint(q)))):
        raise QConvertError(f"pack_groupwise: q must be integers in 0..{maxq} for {bits} bits")
    z = zeros.astype(np.float64)
    if z.size and (not np.all(np.isfinite(z)) or z.min() < 0 or z.max() > maxq or np.any(z != np.rint(z))):
        raise QConvertError(f"pack_groupwise: zeros must be integers in 0..{maxq} for {bits} bits")
    s = scales.astype(np.float64)
    s16 = s.astype(np.float16)
    if not round_scales:
        same = (s16.astype(np.float64) == s) | (np.isnan(s) & np.isnan(s16))
        if not np.all(same):
            bad = s[~same].reshape(-1)[0]
            raise QConvertError(
                f"pack_groupwise: scale {bad!r} is not a float16 value ({name} stores f16 scales); "
                "pass round_scales=True to round the scales to float16"
            )
    q8 = q.astype(np.uint8)
    ts = 3 + bits * group // 8
    raw = np.empty((out_f, ng, ts), np.uint8)
    rows_per = max(1, _CHUNK_ELEMS // in_f)
    for r in range(0, out_f, rows_per):
        sl = slice(r, r + rows_per)
        n = q8[sl].shape[0]
        raw[sl] = _encode(
            q8[sl].reshape(n * ng, group), s16[sl].reshape(-1), z[sl].reshape(-1), bits
        ).reshape(n, ng, ts)
    return raw.reshape(out_f, ng * ts)


def unpack_groupwise(
    raw: np.ndarray, bits: int, group: int, in_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bytes of an ``I{bits}G{group}`` matrix -> ``(q (out, in) uint8, scales (out, in /
    group) float32, zeros (out, in / group) int32)``: the inverse of :func:`pack_groupwise`
    (and the types of :func:`qconvert.blocks.grid.rtn_groupwise`). ``raw``: (out,
    row_bytes) or flat bytes of whole rows."""
    name = type_name(bits, group)
    ng = _check_shape(int(in_features), group, name)
    ts = 3 + bits * group // 8
    raw = np.asarray(raw, dtype=np.uint8)
    row_bytes = ng * ts
    if raw.size % row_bytes or (raw.ndim == 2 and raw.shape[1] != row_bytes):
        raise QConvertError(
            f"{name} rows of {in_features} elements take {row_bytes} bytes; got an array of shape {raw.shape}"
        )
    out_f = raw.size // row_bytes
    q, scale, zero = _decode_parts(raw.reshape(out_f * ng, ts), bits, group)
    return (
        q.reshape(out_f, ng * group),
        scale.reshape(out_f, ng),
        zero.astype(np.int32).reshape(out_f, ng),
    )


# --- registration -----------------------------------------------------------------------

for _bits in BITS:
    for _group in GROUPS:
        _qb, _dqb = _make_codec(_bits, _group)
        register(
            BlockType(
                id=type_id(_bits, _group),
                name=type_name(_bits, _group),
                block_size=_group,
                type_size=type_size(_bits, _group),
                quantize_blocks=_qb,
                dequantize_blocks=_dqb,
                ggml=False,
                description=(
                    f"{_bits}-bit integers in groups of {_group}, f16 scale and u8 zero point per group "
                    f"(GPTQ / AWQ / RTN group-wise): x = (q - zero) * scale"
                ),
            )
        )

__all__ = [
    "BITS",
    "GROUPS",
    "groupwise_type",
    "pack_groupwise",
    "parse_type",
    "type_id",
    "type_name",
    "type_size",
    "unpack_groupwise",
]


@dataclass
class Encoded:
    """One matrix ready for the container: block type, raw bytes, tensor params."""

    type_name: str
    raw: np.ndarray
    params: dict = field(default_factory=dict)


def encode_linear(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, perm: np.ndarray | None) -> Encoded:
    """Integer codes (out, in) in stored column order + per-group scales/zeros -> I{bits}G{group};
    an act-order permutation goes into the ``input_perm`` param."""
    group = q.shape[1] // scales.shape[1]
    raw = pack_groupwise(q, scales, zeros, bits, group)
    params = {"input_perm": [int(i) for i in perm]} if perm is not None else {}
    return Encoded(type_name(bits, group), raw, params)
