"""W8A8: int8 weights with one float32 scale per output row (SmoothQuant-style W8A8 storage).

A row is self-contained: block size 1, type size 1, so a row of ``n`` weights is ``n`` bytes,
each an int8 (two's complement) ``q``; any row length fits. The per-row scales, and the
activation scale the runtime uses to quantize the inputs, are the tensor's params
(FORMAT.md §4)::

    {"act_scale": a | null, "row_scales": [d_0, d_1, ..., d_{rows-1}]}

``row_scales[r]`` is a float32 (written as the shortest decimal that reads back as that
float32, see :func:`qconvert.blocks.nf4.json_f32`); ``act_scale`` is the static per-tensor
activation scale from calibration, or ``null`` for dynamic per-token scales computed at run
time. Decode: ``w[r, i] = f32(q[r, i]) * row_scales[r]`` (one float32 multiplication).

Quantize (per row, float32 arithmetic, one rounding per operation; ``rint`` = round half to
even; the rule :func:`quantize_sym_int8` also applies to activations at run time)::

    amax = max_i |x[i]|
    d    = amax / 127
    id   = (d == 0) ? 0 : 1 / d
    q[i] = clamp(rint(x[i] * id), -127, 127)

The int8 dot products run in integer arithmetic in :mod:`qconvert.runtime.kernels.w8a8`.
"""

from __future__ import annotations

import numpy as np

from ..errors import QConvertError
from .nf4 import json_f32
from .registry import BlockType, register

TYPE_ID = 400
QMAX = 127
_F32 = np.float32
_CHUNK_ELEMS = 1 << 20


def quantize_sym_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``clamp(rint(x * (1/scale)), -127, 127)`` as int8, in float32 (``1/0`` taken as 0).
    ``scale`` broadcasts against ``x`` (one per row: shape (rows, 1))."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    inv = np.zeros_like(scale)
    np.divide(_F32(1.0), scale, out=inv, where=scale != 0)
    return np.clip(np.rint(x * inv), -QMAX, QMAX).astype(np.int8)


def row_scales(values: np.ndarray) -> np.ndarray:
    """Per-row ``max|x| / 127`` in float32: (rows, n) -> (rows,)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape[1] == 0:
        return np.zeros(values.shape[0], np.float32)
    return (np.abs(values).max(axis=1) / _F32(QMAX)).astype(np.float32)


def quantize_rows_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, n) float32 -> (q (rows, n) int8, scales (rows,) float32), per row symmetric."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise QConvertError("W8A8: weights contain NaN or infinite values")
    rows, n = values.shape
    q = np.empty((rows, n), np.int8)
    d = np.empty(rows, np.float32)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for r in range(0, rows, step):
        x = values[r : r + step]
        d[r : r + step] = row_scales(x)
        q[r : r + step] = quantize_sym_int8(x, d[r : r + step, None])
    return q, d


def make_params(scales: np.ndarray, act_scale: float | None = None) -> dict:
    return {
        "act_scale": None if act_scale is None else json_f32(act_scale),
        "row_scales": [json_f32(s) for s in np.asarray(scales, dtype=np.float32)],
    }


def parse_params(params: dict, rows: int) -> tuple[np.ndarray, np.float32 | None]:
    """Validated (row_scales float32 (rows,), act_scale float32 or None) from a tensor's params."""
    if not isinstance(params, dict) or "row_scales" not in params:
        raise QConvertError("a W8A8 tensor needs its params (row_scales, act_scale); none were given")
    try:
        scales = np.asarray([float(s) for s in params["row_scales"]], dtype=np.float64).astype(np.float32)
        act = params.get("act_scale")
        act = None if act is None else np.float32(float(act))
    except (TypeError, ValueError):
        raise QConvertError("W8A8 params: row_scales and act_scale must be numbers") from None
    if scales.shape != (rows,):
        raise QConvertError(f"W8A8 params: {rows} rows need {rows} row_scales, got {scales.size}")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise QConvertError("W8A8 params: row_scales must be finite and non-negative")
    if act is not None and not (np.isfinite(act) and act > 0):
        raise QConvertError(f"W8A8 params: act_scale must be a positive finite number or null, got {act!r}")
    return scales, act


def quantize_w8a8(values: np.ndarray) -> tuple[np.ndarray, dict]:
    """(rows, n) float32 -> ((rows, n) uint8 bytes of the int8 q, params with act_scale null).
    A calibrated method sets ``act_scale`` afterwards."""
    q, d = quantize_rows_int8(values)
    return q.view(np.uint8), make_params(d)


def dequantize_w8a8(blocks: np.ndarray, params: dict) -> np.ndarray:
    """(n_elements, 1) bytes of a whole tensor -> (n_elements, 1) float32."""
    blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1)
    rows = len(params.get("row_scales", ())) if isinstance(params, dict) else 0
    if rows == 0 or blocks.size % rows:
        raise QConvertError(
            f"W8A8 params: {rows} row_scales cannot describe a tensor of {blocks.size} elements"
        )
    scales, _act = parse_params(params, rows)
    q = blocks.view(np.int8).reshape(rows, -1)
    return (q.astype(np.float32) * scales[:, None]).reshape(-1, 1)


def params_max_len(shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return len('{"act_scale":,"row_scales":[]}') + 24 * (rows + 1)


def params_bits(params: dict) -> int:
    """Side data counted as binary f32: one per row, plus the activation scale if static."""
    if not params:
        return 0
    return 32 * (len(params.get("row_scales", ())) + (params.get("act_scale") is not None))


def _needs_params(blocks: np.ndarray) -> np.ndarray:
    raise QConvertError("W8A8 values decode only with their tensor's params (row_scales)")


W8A8 = register(
    BlockType(
        id=TYPE_ID,
        name="W8A8",
        block_size=1,
        type_size=1,
        quantize_blocks=None,
        dequantize_blocks=_needs_params,
        ggml=False,
        description="int8 weights, x = q * row_scales[row]; params row_scales (f32 per row) and act_scale "
        "(static activation scale, or null: dynamic per-token); SmoothQuant-style W8A8",
        quantize_tensor=quantize_w8a8,
        dequantize_tensor=dequantize_w8a8,
        params_max_len=params_max_len,
        params_bits=params_bits,
    )
)

__all__ = [
    "QMAX",
    "TYPE_ID",
    "W8A8",
    "dequantize_w8a8",
    "make_params",
    "parse_params",
    "quantize_rows_int8",
    "quantize_sym_int8",
    "quantize_w8a8",
    "row_scales",
]
