"""Group-wise integer quantization: the primitives GPTQ and AWQ share.

A group of weights ``w`` is stored as integers ``q`` in ``[0, maxq]`` (``maxq = 2**bits - 1``)
with one ``scale`` and one integer ``zero`` per output row and group::

    q  = clamp(round(w / scale) + zero, 0, maxq)
    w' = scale * (q - zero)

``fit_params`` follows AutoGPTQ's ``Quantizer.find_params`` (weight, per channel, no MSE search):

* per row, ``xmin = min(min(w), 0)``, ``xmax = max(max(w), 0)`` (zero is always representable);
* symmetric: ``xmax = max(|xmin|, xmax)``; where ``xmin < 0`` set ``xmin = -xmax``;
  ``zero = (maxq + 1) / 2`` (8 for 4 bits). As in AutoGPTQ, a row with no negative value keeps
  ``xmin = 0``, so its scale is ``xmax / maxq`` while the zero stays at the midpoint;
* rows that are all zero get the range ``[-1, 1]``;
* ``scale = (xmax - xmin) / maxq``; asymmetric ``zero = round(-xmin / scale)``.

One deliberate deviation: containers store scales as fp16, so ``fit_params`` rounds the scale
to the nearest fp16 value (clamped to ``[2**-24, 65504]``, the positive fp16 range) *before*
the zero and the integers are computed. The integers are therefore chosen against exactly the
scale a reader will dequantize with; with fp32 scales (AutoGPTQ) the stored fp16 scale would
differ from the one GPTQ's error feedback assumed. Zeros are integers, so they are exact in any
container. All arithmetic is float64; ``round`` is round-half-to-even, as ``torch.round``.
"""

from __future__ import annotations

import numpy as np

from ..errors import QConvertError

FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0


def check_bits(bits: int) -> int:
    """``maxq`` for ``bits``; bits outside 2..8 are the user's error."""
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise QConvertError(f"--bits must be an integer from 2 to 8, not {bits!r}")
    return (1 << int(bits)) - 1


def n_groups_of(in_features: int, group: int) -> int:
    """Number of column groups; ``group == -1`` means one group per row (per channel)."""
    if group == -1:
        return 1
    if not isinstance(group, (int, np.integer)) or group <= 0:
        raise QConvertError(f"--group must be a positive integer or -1 (per channel), not {group!r}")
    return -(-in_features // group)


def round_scale_fp16(scale: np.ndarray) -> np.ndarray:
    """Nearest fp16 value of each (positive) scale, as float64, kept inside fp16's positive range."""
    s = np.clip(np.asarray(scale, dtype=np.float64), FP16_MIN_SUBNORMAL, FP16_MAX)
    return s.astype(np.float16).astype(np.float64)


def fit_params(W_group_cols: np.ndarray, bits: int, sym: bool, mse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero per row of ``W_group_cols`` (rows, cols): AutoGPTQ ``find_params``, fp16 scale.

    ``mse=True`` then shrinks the min/max range (:func:`shrink_range`) where that lowers the
    row's rounding error. Returns ``(scale (rows,) float64 holding fp16 values, zero (rows,)
    float64 holding integers)``.
    """
    maxq = check_bits(bits)
    x = np.asarray(W_group_cols, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"fit_params expects a non-empty (rows, cols) array, got shape {x.shape}")
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = np.maximum(x.max(axis=1), 0.0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty] = -1.0
    xmax[empty] = 1.0

    scale, zero = _params_for_range(xmin, xmax, maxq, sym)
    if mse:
        scale, zero = shrink_range(x, xmin, xmax, scale, zero, maxq, sym)
    return scale, zero


def _params_for_range(xmin: np.ndarray, xmax: np.ndarray, maxq: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    scale = round_scale_fp16((xmax - xmin) / maxq)
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.clip(np.rint(-xmin / scale), 0, maxq)
    return scale, zero


MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def shrink_range(x, xmin, xmax, scale, zero, maxq: int, sym: bool):
    """Range search of GPTQ's reference quantizer (its ``mse`` option): for ``p = 1 - i/100``,
    ``i = 0 .. 79``, fit the range ``[p·xmin, p·xmax]`` and keep, per row, the ``p`` whose
    dequantized row has the lowest ``Σ |ŵ − w|^2.4`` (the first on ties; ``p = 1`` is the
    plain min/max fit, so the result is never worse than it by that measure).

    Clipping a range trades a few large errors on outliers for finer steps on every other
    weight; at 2-3 bits that trade usually pays. (Plain numpy: its vectorised ``pow`` makes this
    faster than a scalar numba loop; about 7 ns per weight and candidate.)
    """
    best_scale, best_zero = scale.copy(), zero.copy()
    best_err = np.full(x.shape[0], np.inf)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1.0 - i / MSE_GRID
        s, z = (scale, zero) if i == 0 else _params_for_range(p * xmin, p * xmax, maxq, sym)
        d = dequantize(quantize(x, s[:, None], z[:, None], maxq), s[:, None], z[:, None]) - x
        err = (np.abs(d) ** MSE_NORM).sum(axis=1)
        better = err < best_err
        best_err[better] = err[better]
        best_scale[better] = s[better]
        best_zero[better] = z[better]
    return best_scale, best_zero


def quantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    """Integers ``clamp(round(w / scale) + zero, 0, maxq)``; ``scale``/``zero`` broadcast over ``w``.

    Returned as float64 holding integers (callers cast to their storage type).
    """
    w = np.asarray(w, dtype=np.float64)
    return np.clip(np.rint(w / scale) + zero, 0, maxq)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """``scale * (q - zero)`` in float64 (integer inputs are widened first, so no wrap-around)."""
    return np.asarray(scale, np.float64) * (np.asarray(q, np.float64) - np.asarray(zero, np.float64))


def rtn_groupwise(W: np.ndarray, bits: int, group: int, sym: bool, mse: bool = False):
    """Round-to-nearest with one (scale, zero) per row and ``group`` consecutive input columns.

    ``W`` is (out, in); the last group may be shorter when ``group`` does not divide ``in``.
    Returns ``q (out, in) uint8``, ``scales (out, n_groups) float32`` (fp16-exact values),
    ``zeros (out, n_groups) int32``.
    """
    maxq = check_bits(bits)
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"rtn_groupwise expects a 2-D (out, in) weight, got shape {W.shape}")
    out, n_in = W.shape
    g = n_in if group == -1 else group
    ng = n_groups_of(n_in, group)
    q = np.empty((out, n_in), np.uint8)
    scales = np.empty((out, ng), np.float32)
    zeros = np.empty((out, ng), np.int32)
    for k in range(ng):
        cols = slice(k * g, min((k + 1) * g, n_in))
        scale, zero = fit_params(W[:, cols], bits, sym, mse)
        q[:, cols] = quantize(W[:, cols], scale[:, None], zero[:, None], maxq)
        scales[:, k] = scale
        zeros[:, k] = zero
    return q, scales, zeros


def dequantize_groupwise(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """(out, in) float32 weights from ``q (out, in)``, per-group ``scales``/``zeros (out, n_groups)``
    and ``g_idx (in,)``, the group of each input column."""
    g_idx = np.asarray(g_idx)
    return dequantize(q, scales[:, g_idx], zeros[:, g_idx]).astype(np.float32)


def group_index(in_features: int, group: int) -> np.ndarray:
    """``g_idx`` for consecutive groups: ``i // group`` (all zeros for per channel)."""
    g = in_features if group == -1 else group
    return (np.arange(in_features) // g).astype(np.int32)
