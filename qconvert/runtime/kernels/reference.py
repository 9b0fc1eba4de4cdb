"""Plain-numpy references for the kernels (tests and debugging only; slow, whole-matrix).

Written from the layouts in ANCHORS.md §B1 independently of the codecs in
:mod:`qconvert.blocks` and of the numba kernels, so each can be checked against the other.
Dequantisation follows numpy float32 arithmetic exactly as GGML's reference does
(``d * (q - 8)``, ``d * q + m``); products are computed in float64.
"""

from __future__ import annotations

import numpy as np

QK = 32
_F16 = np.dtype("<f2")

# name -> (type_size, has_min, has_qh, centre)
_LEGACY = {
    "Q4_0": (18, False, False, 8),
    "Q4_1": (20, True, False, 0),
    "Q5_0": (22, False, True, 16),
    "Q5_1": (24, True, True, 0),
    "Q8_0": (34, False, False, 0),
}
_FLOATS = {"F32": 4, "F16": 2, "BF16": 2}

TYPES = tuple(_FLOATS) + tuple(_LEGACY)


def f16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bit patterns -> float32 via numpy's float16 (exact)."""
    return np.asarray(bits, dtype=np.uint16).view(_F16).astype(np.float32)


def _legacy_parts(raw: np.ndarray, name: str, row_length: int):
    """-> (d, m or None, q) with d, m float32 of shape (rows, nb, 1) and q int32 (rows, nb, 32),
    q already centred for the symmetric types."""
    size, has_min, has_qh, centre = _LEGACY[name]
    rows = raw.shape[0]
    nb = row_length // QK
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, size)
    d = f16_to_f32(blocks[..., 0:2].copy().view(np.uint16))
    off = 2
    m = None
    if has_min:
        m = f16_to_f32(blocks[..., 2:4].copy().view(np.uint16))
        off = 4
    if name == "Q8_0":
        q = blocks[..., 2:34].view(np.int8).astype(np.int32)
        return d, m, q
    qh = None
    if has_qh:
        qh = blocks[..., off : off + 4].copy().view("<u4")  # (rows, nb, 1)
        off += 4
    qs = blocks[..., off : off + 16].astype(np.int32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j | element j + 16
    if qh is not None:
        bits = (qh.astype(np.int64) >> np.arange(32)) & 1
        q = q | (bits.astype(np.int32) << 4)
    return d, m, q - centre


def dequantize(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    """Packed (rows, row_bytes) -> float32 (rows, row_length)."""
    raw = np.asarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    if name == "F32":
        return np.ascontiguousarray(raw).view("<f4").reshape(rows, row_length).astype(np.float32)
    if name == "F16":
        return np.ascontiguousarray(raw).view(_F16).reshape(rows, row_length).astype(np.float32)
    if name == "BF16":
        u = np.ascontiguousarray(raw).view("<u2").reshape(rows, row_length).astype(np.uint32)
        return (u << 16).view(np.float32)
    d, m, q = _legacy_parts(raw, name, row_length)
    w = d * q.astype(np.float32)
    if m is not None:
        w = w + m
    return w.reshape(rows, row_length).astype(np.float32)


def min_terms(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    """Per-element |m| of the block minimum (zeros for types without one), float64 (rows, n).

    The kernels compute d * sum(q x) + m * sum(x) per block; their rounding error scales with
    |d q x| + |m x| rather than |w x|, so tests include this term in the error scale."""
    raw = np.asarray(raw, dtype=np.uint8)
    if name not in _LEGACY or not _LEGACY[name][1]:
        return np.zeros((raw.shape[0], row_length))
    _d, m, _q = _legacy_parts(raw, name, row_length)
    return np.broadcast_to(np.abs(m.astype(np.float64)), (raw.shape[0], row_length // QK, QK)).reshape(
        raw.shape[0], row_length
    )


def matvec(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """float64 W_dequant @ x."""
    x = np.asarray(x, dtype=np.float64)
    return dequantize(raw, name, x.shape[-1]).astype(np.float64) @ x


def matmul(raw: np.ndarray, name: str, X: np.ndarray) -> np.ndarray:
    """float64 X @ W_dequant.T, (T, out)."""
    X = np.asarray(X, dtype=np.float64)
    return X @ dequantize(raw, name, X.shape[-1]).astype(np.float64).T


def error_scale(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """sum_j (|w_ij| + |m_ij|) |x_j| per output (x (in,) or (T, in)): the magnitude a
    float32 rounding error of the product is relative to."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    n = x.shape[-1]
    a = np.abs(dequantize(raw, name, n).astype(np.float64)) + min_terms(raw, name, n)
    return x @ a.T
