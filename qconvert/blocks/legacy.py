"""GGML's original 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Byte-identical with llama.cpp's ``quantize_row_*_ref`` (what ``llama-quantize`` writes when
no importance matrix is given) and with gguf-py's numpy port. The rules, per block of 32
float32 values x[0..31], all arithmetic in float32:

- Q8_0: amax = max|x|; d = amax / 127; id = 1/d (0 if d == 0); q = roundf(x*id) (halves away
  from zero); store f16(d), int8 q[32].
- Q4_0 / Q5_0: m = the first x with the largest |x| (sign kept); d = m / -8 (Q5_0: -16);
  id = 1/d (0 if d == 0); q = min(15, trunc(x*id + 8.5)) (Q5_0: min(31, trunc(x*id + 16.5))).
- Q4_1 / Q5_1: lo = min x, hi = max x; d = (hi - lo) / 15 (Q5_1: 31); id = 1/d (0 if d == 0);
  q = min(15, trunc((x - lo)*id + 0.5)) (Q5_1: min(31, ...)); store f16(d), f16(lo).

f16(.) is IEEE binary16 round-to-nearest-even of the float32; note that q is computed with
the unrounded float32 d, not with f16(d). Packing: 4-bit q (or the low 4 bits of a 5-bit q):
byte j of qs = q[j] | q[j+16] << 4. Q5's fifth bits: u32 qh (little-endian), bit i = q[i] >> 4.

With an importance vector (llama.cpp's imatrix, one weight per column) Q4_0, Q4_1, Q5_0 and
Q5_1 follow llama.cpp's ``quantize_q4_0`` etc. with ``quant_weights``: per row
sigma2 = sum(x^2)/row_length, per element w = imp * sqrt(sigma2 + x^2); Q4_0/Q5_0 take
d and q from ``make_qx_quants(32, 8|16, x, w)``, Q4_1/Q5_1 take d, m = -min and q from
``make_qkx3_quants(32, 15|31, x, w, -0.9, 0.05, 36)`` (the searches are described in
:mod:`qconvert.blocks.kquants`, which runs them). Without one they are the reference
quantizers above, byte for byte. Q8_0 ignores the importance vector, as llama.cpp does.
"""

from __future__ import annotations

import numpy as np

from .registry import BlockType, register

QK = 32  # elements per block for every type in this module
_F16 = np.dtype("<f2")
_CHUNK = 8192  # blocks per pass (1 MiB of float32): keeps temporaries in cache


def _chunked(kernel, blocks: np.ndarray, type_size: int) -> np.ndarray:
    """Run ``kernel(x, out)`` over slices of (n, 32) float32 blocks into (n, type_size) bytes."""
    blocks = np.ascontiguousarray(blocks, dtype=np.float32)
    n = blocks.shape[0]
    out = np.empty((n, type_size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        kernel(blocks[start : start + _CHUNK], out[start : start + _CHUNK])
    return out


def _chunked_dequant(kernel, blocks: np.ndarray) -> np.ndarray:
    """Run ``kernel(b) -> (m, 32) float32`` over slices of (n, type_size) bytes."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = blocks.shape[0]
    out = np.empty((n, QK), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = kernel(blocks[start : start + _CHUNK])
    return out


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d == 0 (the reference's ``id = d ? 1.0f/d : 0.0f``)."""
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)
    return inv


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) bytes of the nearest-even binary16."""
    return v.astype(_F16).view(np.uint8)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the first element with the largest magnitude, sign kept: (n, 1)."""
    idx = np.abs(x).argmax(axis=1)
    return x[np.arange(x.shape[0]), idx][:, None]


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (exact, no ``+0.5`` rounding trap)."""
    a = np.abs(v)
    r = np.floor(a)
    r += (a - r) >= np.float32(0.5)  # a - floor(a) is exact in float32
    return np.copysign(r, v)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 values 0..15 (or low nibbles) -> (n, 16): byte j = q[j] | q[j+16] << 4."""
    return (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) uint8 nibbles, element j from byte j low, j+16 from byte j high."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes of a little-endian u32 whose bit i is q[i] >> 4."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes -> (n, 32) uint8 values 0 or 16."""
    return np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)


def _f16_col(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(n, type_size) bytes -> (n, 1) float32 of the f16 at byte ``offset``."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(_F16).astype(np.float32)


# --- Q8_0: d f16 | qs int8[32] -------------------------------------------------------------


def _q8_0_kernel(x: np.ndarray, out: np.ndarray) -> None:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(x * _inverse(d))
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:34] = q.astype(np.int8).view(np.uint8)


def _q8_0_quantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked(_q8_0_kernel, blocks, 34)


def _q8_0_dequant_kernel(blocks: np.ndarray) -> np.ndarray:
    d = _f16_col(blocks, 0)
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return d * q


def _q8_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked_dequant(_q8_0_dequant_kernel, blocks)


# --- Q4_0: d f16 | qs u8[16] ---------------------------------------------------------------


def _q4_0_kernel(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / np.float32(-8)
    # x*id lies in [-8, 8] (up to rounding), so x*id + 8.5 > 0 and the uint8 cast truncates.
    q = np.minimum((x * _inverse(d) + np.float32(8.5)).astype(np.uint8), np.uint8(15))
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:18] = _pack_nibbles(q)


def _q4_0_quantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked(_q4_0_kernel, blocks, 18)


def _q4_0_dequant_kernel(blocks: np.ndarray) -> np.ndarray:
    d = _f16_col(blocks, 0)
    q = _unpack_nibbles(blocks[:, 2:18]).astype(np.float32) - np.float32(8)
    return d * q


def _q4_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked_dequant(_q4_0_dequant_kernel, blocks)


# --- Q4_1: d f16 | m f16 | qs u8[16] -------------------------------------------------------


def _q4_1_kernel(x: np.ndarray, out: np.ndarray) -> None:
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = np.minimum(((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8), np.uint8(15))
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:20] = _pack_nibbles(q)


def _q4_1_quantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked(_q4_1_kernel, blocks, 20)


def _q4_1_dequant_kernel(blocks: np.ndarray) -> np.ndarray:
    d = _f16_col(blocks, 0)
    m = _f16_col(blocks, 2)
    q = _unpack_nibbles(blocks[:, 4:20]).astype(np.float32)
    return d * q + m


def _q4_1_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked_dequant(_q4_1_dequant_kernel, blocks)


# --- Q5_0: d f16 | qh u32 | qs u8[16] ------------------------------------------------------


def _q5_0_kernel(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / np.float32(-16)
    q = np.minimum((x * _inverse(d) + np.float32(16.5)).astype(np.uint8), np.uint8(31))
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:6] = _pack_high_bits(q)
    out[:, 6:22] = _pack_nibbles(q)


def _q5_0_quantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked(_q5_0_kernel, blocks, 22)


def _q5_0_dequant_kernel(blocks: np.ndarray) -> np.ndarray:
    d = _f16_col(blocks, 0)
    q = _unpack_nibbles(blocks[:, 6:22]) | _unpack_high_bits(blocks[:, 2:6])
    return d * (q.astype(np.float32) - np.float32(16))


def _q5_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked_dequant(_q5_0_dequant_kernel, blocks)


# --- Q5_1: d f16 | m f16 | qh u32 | qs u8[16] ----------------------------------------------


def _q5_1_kernel(x: np.ndarray, out: np.ndarray) -> None:
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / np.float32(31)
    q = np.minimum(((x - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8), np.uint8(31))
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:8] = _pack_high_bits(q)
    out[:, 8:24] = _pack_nibbles(q)


def _q5_1_quantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked(_q5_1_kernel, blocks, 24)


def _q5_1_dequant_kernel(blocks: np.ndarray) -> np.ndarray:
    d = _f16_col(blocks, 0)
    m = _f16_col(blocks, 2)
    q = _unpack_nibbles(blocks[:, 8:24]) | _unpack_high_bits(blocks[:, 4:8])
    return d * q.astype(np.float32) + m


def _q5_1_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _chunked_dequant(_q5_1_dequant_kernel, blocks)


def _rows_with_importance(type_id: int, quantize_blocks, type_size: int):
    """quantize_rows for Q4_0/Q4_1/Q5_0/Q5_1: the reference quantizer without importance,
    llama.cpp's imatrix search with it."""

    def quantize_rows(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n_rows, n = rows.shape
        if importance is None:
            return quantize_blocks(rows.reshape(-1, QK)).reshape(n_rows, n // QK * type_size)
        from .kquants import quantize_legacy_imatrix

        return quantize_legacy_imatrix(type_id, rows, importance)

    return quantize_rows


_NIBBLES = "(element j low nibble, j+16 high nibble)"

Q4_0 = register(
    BlockType(
        id=2,
        name="Q4_0",
        block_size=QK,
        type_size=18,
        quantize_blocks=_q4_0_quantize,
        dequantize_blocks=_q4_0_dequantize,
        quantize_rows=_rows_with_importance(2, _q4_0_quantize, 18),
        description=f"x = (q - 8) * d; d: f16, 16 bytes of 4-bit q {_NIBBLES}",
    )
)

Q4_1 = register(
    BlockType(
        id=3,
        name="Q4_1",
        block_size=QK,
        type_size=20,
        quantize_blocks=_q4_1_quantize,
        dequantize_blocks=_q4_1_dequantize,
        quantize_rows=_rows_with_importance(3, _q4_1_quantize, 20),
        description=f"x = q * d + m; d, m: f16, 16 bytes of 4-bit q {_NIBBLES}",
    )
)

Q5_0 = register(
    BlockType(
        id=6,
        name="Q5_0",
        block_size=QK,
        type_size=22,
        quantize_blocks=_q5_0_quantize,
        dequantize_blocks=_q5_0_dequantize,
        quantize_rows=_rows_with_importance(6, _q5_0_quantize, 22),
        description="x = (q - 16) * d; d: f16, qh: u32 (bit j = bit 4 of q[j]), "
        f"16 bytes of low 4 bits of q {_NIBBLES}",
    )
)

Q5_1 = register(
    BlockType(
        id=7,
        name="Q5_1",
        block_size=QK,
        type_size=24,
        quantize_blocks=_q5_1_quantize,
        dequantize_blocks=_q5_1_dequantize,
        quantize_rows=_rows_with_importance(7, _q5_1_quantize, 24),
        description="x = q * d + m; d, m: f16, qh: u32 (bit j = bit 4 of q[j]), "
        f"16 bytes of low 4 bits of q {_NIBBLES}",
    )
)

Q8_0 = register(
    BlockType(
        id=8,
        name="Q8_0",
        block_size=QK,
        type_size=34,
        quantize_blocks=_q8_0_quantize,
        dequantize_blocks=_q8_0_dequantize,
        description="x = q * d; d: f16, 32 bytes of int8 q",
    )
)
