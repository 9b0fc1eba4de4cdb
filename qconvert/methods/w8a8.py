"""W8A8: int8 weights per output channel, int8 activations (static per tensor from calibration,
or dynamic per token), with optional SmoothQuant (Xiao et al., 2023; ANCHORS.md §C5).

Pure functions over arrays (the calibration pipeline's ``steps.Smooth`` / ``steps.W8A8`` call
them on each layer's input groups):

* :func:`quantize_weight` - per-row symmetric int8 (``d = max|w_r| / 127``), the W8A8 codec;
* :func:`smooth_scales` - SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)``, the weight max
  over the rows of every linear that reads the same input, both clamped at 1e-5
  (mit-han-lab ``smooth_ln_fcs``); folded with :func:`qconvert.methods.awq.fold_into_norm`
  (norm weight ÷ s, the linears' columns × s; exact in real arithmetic);
* the static activation scale of each linear is ``threshold(8) / 127`` of an observer fed the
  linear's (smoothed) input; linears that read the same input share one observer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..blocks.w8a8 import QMAX, make_params, quantize_rows_int8
from ..errors import QConvertError

ACT_MODES = ("static", "dynamic")
OBSERVERS = ("minmax", "percentile", "entropy", "mse")
TYPE_NAME = "W8A8"
_CLAMP = 1e-5


# ----------------------------------------------------------------------------- pure functions


def quantize_weight(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) float -> (q (out, in) int8, row scales (out,) float32): per output channel,
    symmetric, ``q = clamp(rint(w / d), -127, 127)`` with ``d = max|w_r| / 127``."""
    return quantize_rows_int8(np.asarray(W, dtype=np.float32))


def weight_channel_amax(Ws: Sequence[np.ndarray]) -> np.ndarray:
    """Per input channel, max |w| over the rows of all ``Ws`` (each (out_i, in)), float64."""
    return np.max([np.abs(np.asarray(W, dtype=np.float64)).max(axis=0) for W in Ws], axis=0)


def smooth_scales(act_amax: np.ndarray, Ws: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel scales (float32 (in,))::

        s_j = clamp(max|X_j|^α / clamp(max_rows |W_j|, 1e-5)^(1−α), 1e-5)

    ``act_amax``: max |x_j| over the calibration tokens; ``Ws``: the linears sharing the input."""
    if not 0.0 <= alpha <= 1.0:
        raise QConvertError(f"--smooth takes a migration strength α in [0, 1], got {alpha}")
    a = np.asarray(act_amax, dtype=np.float64)
    w = np.maximum(weight_channel_amax(Ws), _CLAMP)
    if a.shape != w.shape:
        raise QConvertError(f"activation maxima ({a.shape}) and weights ({w.shape}) disagree on the input width")
    s = np.maximum(a**alpha / w ** (1.0 - alpha), _CLAMP)
    return s.astype(np.float32)


def act_scale_from_threshold(amax: float) -> float | None:
    """The static activation scale ``f32(amax) / 127`` (float32); None when the observer saw
    only zeros (that tensor then quantizes its inputs per token at run time)."""
    s = np.float32(np.float32(amax) / np.float32(QMAX))
    return float(s) if np.isfinite(s) and s > 0 else None


def encode(W: np.ndarray, act_scale: float | None):
    """A W8A8 :class:`~qconvert.methods.calibrated.Encoded` of ``W`` (out, in)."""
    from ..blocks.groupwise import Encoded

    q, d = quantize_weight(W)
    return Encoded(TYPE_NAME, q.view(np.uint8), make_params(d, act_scale))


def check_options(observer: str, smooth: float | None, act_mode: str) -> str:
    from ..observers import make_observer

    if act_mode not in ACT_MODES:
        raise QConvertError(f"--act-mode must be static or dynamic, not {act_mode!r}")
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise QConvertError(f"--smooth takes a migration strength α in [0, 1], got {smooth}")
    return make_observer(observer).name  # validates (and resolves aliases such as kl)
