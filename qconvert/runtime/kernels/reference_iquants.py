"""Plain-numpy references for the IQ4_NL / IQ4_XS kernels (tests, debugging; slow).

Written from the layouts in FORMAT.md §7 element by element, independently of the codecs in
:mod:`qconvert.blocks` and of the numba kernels. Not a kernel family: the package loader
imports it, which only defines functions.
"""

from __future__ import annotations

import numpy as np

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
#: name -> (block size, type size)
LAYOUT = {"IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
TYPES = tuple(LAYOUT)


def dequantize(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    bs, ts = LAYOUT[name]
    blocks = np.asarray(raw, np.uint8).reshape(raw.shape[0], row_length // bs, ts)
    d = blocks[..., 0:2].copy().view("<f2").astype(np.float32)[..., 0]  # (rows, nb)
    out = np.empty((raw.shape[0], row_length // bs, bs), np.float32)
    ng = bs // 32
    qoff = 2 if ng == 1 else 8
    for g in range(ng):
        if ng == 1:
            dl = d
        else:
            lo = (blocks[..., 4 + g // 2].astype(np.int32) >> (4 * (g % 2))) & 0xF
            hi = (blocks[..., 3 if g >= 4 else 2].astype(np.int32) >> (2 * (g % 4))) & 3
            dl = d * ((lo | (hi << 4)) - 32).astype(np.float32)
        for j in range(16):
            q = blocks[..., qoff + 16 * g + j]
            out[..., 32 * g + j] = dl * KVALUES[q & 0xF]
            out[..., 32 * g + 16 + j] = dl * KVALUES[q >> 4]
    return out.reshape(raw.shape[0], row_length)


def matvec(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """float64 product of the dequantised rows with x."""
    return dequantize(raw, name, x.shape[-1]).astype(np.float64) @ np.asarray(x, np.float64)


def matmul(raw: np.ndarray, name: str, X: np.ndarray) -> np.ndarray:
    return np.asarray(X, np.float64) @ dequantize(raw, name, X.shape[-1]).astype(np.float64).T


def error_scale(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """sum_j |w_j x_j| per output (the scale of float32 rounding errors)."""
    W = np.abs(dequantize(raw, name, x.shape[-1]).astype(np.float64))
    x = np.abs(np.asarray(x, np.float64))
    return W @ x if x.ndim == 1 else x @ W.T
