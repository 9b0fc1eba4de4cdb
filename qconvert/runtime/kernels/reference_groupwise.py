"""Plain-numpy references for the group-wise integer kernels (tests and debugging only).

Written from the layout in FORMAT.md §7 (``I{bits}G{group}``) independently of the codec in
:mod:`qconvert.blocks.groupwise` and of the numba kernels: each block is
``scale:f16 | zero:u8 | qs``, element i of qs at bit offset i * bits, LSB first, and
``x = (q - zero) * scale``. Bits are read one at a time with ``np.unpackbits`` (a different
route from the codec's 64-bit words). Products are computed in float64.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
TYPES = tuple(f"I{b}G{g}" for b in BITS for g in GROUPS)


def params(name: str) -> tuple[int, int]:
    """``"I3G64"`` -> (3, 64)."""
    bits, group = name.upper()[1:].split("G")
    return int(bits), int(group)


def type_size(name: str) -> int:
    bits, group = params(name)
    return 3 + bits * group // 8


def parts(raw: np.ndarray, name: str, row_length: int):
    """Packed (rows, row_bytes) -> (q (rows, n) int64, scale (rows, nb) float32, zero
    (rows, nb) int64), nb = n / group."""
    bits, group = params(name)
    raw = np.asarray(raw, dtype=np.uint8)
    rows, nb = raw.shape[0], row_length // group
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, type_size(name))
    scale = blocks[..., 0].astype(np.uint16) | (blocks[..., 1].astype(np.uint16) << 8)
    scale = scale.view(np.float16).astype(np.float32)
    zero = blocks[..., 2].astype(np.int64)
    bitstream = np.unpackbits(blocks[..., 3:], axis=-1, bitorder="little")  # (rows, nb, group*bits)
    weights = 1 << np.arange(bits, dtype=np.int64)
    q = (bitstream.reshape(rows, nb, group, bits).astype(np.int64) * weights).sum(-1)
    return q.reshape(rows, row_length), scale, zero


def dequantize(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    """Packed (rows, row_bytes) -> float32 (rows, row_length): f32(q - zero) * f32(scale)."""
    _bits, group = params(name)
    q, scale, zero = parts(raw, name, row_length)
    c = (q - np.repeat(zero, group, axis=1)).astype(np.float32)
    return c * np.repeat(scale, group, axis=1)


def matvec(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """float64 W_dequant @ x."""
    x = np.asarray(x, dtype=np.float64)
    return dequantize(raw, name, x.shape[-1]).astype(np.float64) @ x


def matmul(raw: np.ndarray, name: str, X: np.ndarray) -> np.ndarray:
    """float64 X @ W_dequant.T, (T, out)."""
    X = np.asarray(X, dtype=np.float64)
    return X @ dequantize(raw, name, X.shape[-1]).astype(np.float64).T


def error_scale(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """sum_j |w_ij| |x_j| per output (x (in,) or (T, in)): what a float32 rounding error of
    the product is relative to (the kernels centre q in integers, so there is no min term)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return x @ np.abs(dequantize(raw, name, x.shape[-1]).astype(np.float64)).T


def random_blocks(rng: np.random.Generator, name: str, rows: int, row_length: int) -> np.ndarray:
    """Random valid packed rows: q and zero uniform in 0..2**bits - 1, scales finite positive
    halves over several decades (normal and subnormal), some of them negative."""
    bits, group = params(name)
    nb = row_length // group
    ts = type_size(name)
    raw = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    mag = np.exp2(rng.uniform(-20, 4, size=(rows, nb))).astype(np.float16)
    sign = np.where(rng.random((rows, nb)) < 0.1, -1, 1).astype(np.float16)
    raw[..., 0:2] = (mag * sign).reshape(rows, nb, 1).view(np.uint8).reshape(rows, nb, 2)
    raw[..., 2] = rng.integers(0, 1 << bits, size=(rows, nb), dtype=np.uint8)
    return raw.reshape(rows, nb * ts)
