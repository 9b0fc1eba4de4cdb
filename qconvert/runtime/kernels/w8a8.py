"""Kernels for W8A8 (qconvert/blocks/w8a8.py): int8 weights x int8 activations in integers.

A W8A8 matrix is (out, in) int8 ``q`` with one float32 scale per row (``row_scales``), and an
activation scale ``act_scale`` (static, per tensor, from calibration) or none (dynamic: one
scale per token, computed here). ``y = W x`` runs as:

1. quantize each token x_t (float32) to int8 with its scale ``a_t`` (``act_scale``, or
   ``max_k |x_t,k| / 127`` when dynamic)::

       id = (a_t == 0) ? 0 : 1 / a_t;   xq = clamp(rint(x * id), -127, 127)     (float32)

2. ``acc[t, r] = sum_k q[r, k] * xq[t, k]`` in integer arithmetic (exact: |acc| <=
   127 * 127 * in < 2^31 for in <= 133,143, checked when the tensor is loaded);
3. ``y[t, r] = f32(acc[t, r]) * f32(row_scales[r] * a_t)`` (two float32 roundings).

This is real integer W8A8 (what an int8 GEMM engine computes), not fake quantization: the
activations lose precision here, at run time, exactly as the calibration assumed. Every step
is deterministic, so the numpy reference in :mod:`.reference_w8a8` reproduces the int32
accumulations and the float32 outputs bit for bit (tests/test_w8a8.py).

Speed: the inner loop is an int8 dot product that LLVM vectorises into 32-bit integer
multiply-adds (about as fast per element as the float32 GEMM on AVX2; measured 25 GMAC/s on
one core for (512 x 576) x (576 x 1536)).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...blocks.w8a8 import QMAX, parse_params
from ...errors import QConvertError
from . import register_kernel

#: the longest row whose int8 x int8 sums cannot overflow int32
MAX_IN = (2**31 - 1) // (QMAX * QMAX)


class W8A8Aux:
    """What a W8A8 kernel needs besides the int8 bytes: float32 ``row_scales`` (out,) and the
    static ``act_scale`` (float32), or ``act_scale = None`` for dynamic per-token scales."""

    __slots__ = ("row_scales", "act_scale", "rows")

    def __init__(self, row_scales: np.ndarray, act_scale) -> None:
        self.row_scales = np.ascontiguousarray(row_scales, dtype=np.float32)
        self.act_scale = None if act_scale is None else np.float32(act_scale)
        self.rows = int(self.row_scales.shape[0])

    @property
    def dynamic(self) -> bool:
        return self.act_scale is None

    def check(self, raw: np.ndarray, row_length: int) -> None:
        if raw.shape[0] != self.rows:
            raise QConvertError(f"W8A8 params have {self.rows} row_scales, the packed matrix has {raw.shape[0]} rows")
        if row_length > MAX_IN:
            raise QConvertError(f"W8A8 rows longer than {MAX_IN} elements could overflow the int32 sums")


def prepare(params: dict, shape: tuple[int, ...]) -> W8A8Aux:
    """Tensor params -> the kernels' aux (validated once, when a Linear/Embedding is built)."""
    if len(shape) != 2:
        raise QConvertError(f"W8A8 tensors are matrices, got shape {list(shape)}")
    if shape[1] > MAX_IN:
        raise QConvertError(f"W8A8 rows longer than {MAX_IN} elements could overflow the int32 sums")
    scales, act = parse_params(params, int(shape[0]))
    return W8A8Aux(scales, act)


# --- numba kernels --------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _quantize_acts(X, act_scale, dynamic, Xq, a_scales):
    """X (T, n) float32 -> Xq (T, n) int8 and a_scales (T,) float32 (see the module doc)."""
    T, n = X.shape
    one = np.float32(1.0)
    qmax = np.float32(QMAX)
    for t in prange(T):
        s = np.float32(act_scale)
        if dynamic:
            amax = np.float32(0.0)
            for k in range(n):
                v = abs(X[t, k])
                if v > amax:
                    amax = v
            s = np.float32(amax / qmax)
        inv = np.float32(0.0)
        if s != 0:
            inv = np.float32(one / s)
        for k in range(n):
            v = np.rint(np.float32(X[t, k] * inv))
            if v > qmax:
                v = qmax
            elif v < -qmax:
                v = -qmax
            Xq[t, k] = np.int8(v)
        a_scales[t] = s


@njit(cache=True, parallel=True)
def _int_gemm(Wq, Xq, acc):
    """acc (T, out) int32 = Xq (T, n) int8 @ Wq (out, n) int8 ^T, summed in integers."""
    n_out, n = Wq.shape
    T = Xq.shape[0]
    for r in prange(n_out):
        for t in range(T):
            s = np.int32(0)
            for k in range(n):
                s += np.int32(Wq[r, k]) * np.int32(Xq[t, k])
            acc[t, r] = s


@njit(cache=True, parallel=True)
def _rescale(acc, row_scales, a_scales, out):
    """out[t, r] = f32(acc[t, r]) * f32(row_scales[r] * a_scales[t])."""
    T, n_out = acc.shape
    for t in prange(T):
        a = a_scales[t]
        for r in range(n_out):
            out[t, r] = np.float32(acc[t, r]) * np.float32(row_scales[r] * a)


@njit(cache=True, parallel=True)
def _dequant_rows(Wq, ids, row_scales, out):
    n = out.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        d = row_scales[r]
        for k in range(n):
            out[i, k] = np.float32(Wq[r, k]) * d


# --- the steps, callable from Python (the tests compare each with the reference) -------------


def quantize_activations(X: np.ndarray, aux: W8A8Aux) -> tuple[np.ndarray, np.ndarray]:
    """(T, n) float32 -> (xq (T, n) int8, a_scales (T,) float32) as the kernel quantizes them."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    T, n = X.shape
    Xq = np.empty((T, n), np.int8)
    a_scales = np.empty(T, np.float32)
    static = np.float32(0.0) if aux.dynamic else aux.act_scale
    _quantize_acts(X, static, aux.dynamic, Xq, a_scales)
    return Xq, a_scales


def int_accumulate(raw: np.ndarray, Xq: np.ndarray) -> np.ndarray:
    """int32 (T, out): the integer dot products of the int8 rows of ``raw`` with ``Xq``."""
    Wq = np.asarray(raw).view(np.int8)
    acc = np.empty((Xq.shape[0], Wq.shape[0]), np.int32)
    _int_gemm(Wq, np.ascontiguousarray(Xq, dtype=np.int8), acc)
    return acc


def matmul(raw: np.ndarray, X: np.ndarray, aux: W8A8Aux) -> np.ndarray:
    """(T, in) float32 -> (T, out) float32."""
    aux.check(raw, X.shape[1])
    Xq, a_scales = quantize_activations(X, aux)
    acc = int_accumulate(raw, Xq)
    out = np.empty(acc.shape, np.float32)
    _rescale(acc, aux.row_scales, a_scales, out)
    return out


def matvec(raw: np.ndarray, x: np.ndarray, aux: W8A8Aux) -> np.ndarray:
    return matmul(raw, x.reshape(1, -1), aux)[0]


def dequant_rows(raw: np.ndarray, ids: np.ndarray, row_length: int, out=None, aux: W8A8Aux | None = None) -> np.ndarray:
    """Rows ``ids`` as float32 ``q * row_scales[row]`` (the codec's values, bit for bit)."""
    if aux is None:
        raise QConvertError("W8A8 rows decode only with the tensor's params (aux)")
    aux.check(raw, row_length)
    if out is None:
        out = np.empty((ids.shape[0], row_length), np.float32)
    _dequant_rows(np.asarray(raw).view(np.int8), ids, aux.row_scales, out)
    return out


register_kernel("W8A8", matvec, matmul, dequant_rows=dequant_rows, block_size=1, type_size=1, prepare=prepare)

__all__ = ["MAX_IN", "W8A8Aux", "dequant_rows", "int_accumulate", "matmul", "matvec", "prepare", "quantize_activations"]
