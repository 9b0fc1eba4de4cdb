"""Plain-numpy reference for the W8A8 kernels (tests and debugging only).

Written from the rules in FORMAT.md (W8A8) and :mod:`.w8a8`'s docstring, independently of the
numba code: activations are quantized with numpy float32 arithmetic, the dot products are
summed in int64 by ``np.matmul`` (equal to the kernel's int32 sums whenever those cannot
overflow), and the rescale is done in float32 in the same order as the kernel.
"""

from __future__ import annotations

import numpy as np

QMAX = 127


def unpack(raw: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray, np.float32 | None]:
    """Packed (rows, n) bytes + params -> (q (rows, n) int64, row_scales (rows,) float32,
    act_scale float32 or None)."""
    q = np.ascontiguousarray(raw, dtype=np.uint8).view(np.int8).astype(np.int64)
    scales = np.array([float(s) for s in params["row_scales"]], dtype=np.float64).astype(np.float32)
    act = params.get("act_scale")
    return q, scales, None if act is None else np.float32(float(act))


def quantize_activations(X: np.ndarray, act_scale) -> tuple[np.ndarray, np.ndarray]:
    """(T, n) float32 -> (xq (T, n) int64, a (T,) float32); ``act_scale`` None = per token."""
    X = np.asarray(X, dtype=np.float32)
    if act_scale is None:
        a = (np.abs(X).max(axis=1) / np.float32(QMAX)).astype(np.float32)
    else:
        a = np.full(X.shape[0], act_scale, dtype=np.float32)
    inv = np.zeros_like(a)
    nz = a != 0
    inv[nz] = np.float32(1.0) / a[nz]
    xq = np.clip(np.rint((X * inv[:, None]).astype(np.float32)), -QMAX, QMAX).astype(np.int64)
    return xq, a


def int_accumulate(q: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """(T, rows) int64 sums of xq @ q.T."""
    return np.asarray(xq, dtype=np.int64) @ np.asarray(q, dtype=np.int64).T


def linear(raw: np.ndarray, params: dict, X: np.ndarray) -> np.ndarray:
    """y (T, out) float32 for x (T, in), or (out,) for (in,)."""
    X = np.asarray(X, dtype=np.float32)
    one = X.ndim == 1
    X = X.reshape(-1, X.shape[-1])
    q, scales, act = unpack(raw, params)
    xq, a = quantize_activations(X, act)
    acc = int_accumulate(q, xq)
    y = acc.astype(np.float32) * (scales[None, :] * a[:, None]).astype(np.float32)
    return y[0] if one else y


def fake_quant_linear(raw: np.ndarray, params: dict, X: np.ndarray) -> np.ndarray:
    """float64 ``dequant(xq) @ dequant(W).T``: the same numbers by another route (a check that
    the integer path computes what W8A8 means)."""
    X = np.asarray(X, dtype=np.float32).reshape(-1, np.shape(X)[-1])
    q, scales, act = unpack(raw, params)
    xq, a = quantize_activations(X, act)
    return (xq * a[:, None].astype(np.float64)) @ (q * scales[:, None].astype(np.float64)).T
