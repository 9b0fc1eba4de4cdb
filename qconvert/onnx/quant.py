"""How ONNX weights are encoded: per-channel int8 in Q8_0 bytes, GGML blocks, floats.

``int8`` (per output channel, symmetric, zero point 0), per row ``w`` of the container
orientation (one output channel)::

    s    = max|w| / 127                           (float32)
    d    = f16(s), rounded up when f16(s) < s     (so no weight is clipped; d >= s)
    q[i] = clamp(rint(w[i] / d), -127, 127)       (rint: half to even, float32 division)

and every Q8_0 block of the row stores ``d`` and its 32 ``q``: the bytes are valid Q8_0 and
decode to ``q·d`` with any Q8_0 reader, and the row is exactly per-channel int8 with scale
``d`` (what a QDQ ``DequantizeLinear`` with per-axis scales computes). A row that is all zeros
gets ``d = 0``. Rows whose length is not a multiple of 32 are padded with zeros (which decode to
zero and leave the scale alone) to the next multiple of 32.

``Q8_0`` / ``Q4_0``: GGML's blocks of 32 (FORMAT.md §7), the same padding.
"""

from __future__ import annotations

import numpy as np

from ..blocks import by_name
from ..errors import QConvertError

QK = 32
SCHEMES = ("int8", "Q8_0", "Q4_0", "F32", "F16")
# scheme -> container block type
SCHEME_TYPE = {"int8": "Q8_0", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "F32": "F32", "F16": "F16"}
_F16 = np.dtype("<f2")


def padded(n: int) -> int:
    return -(-n // QK) * QK


def pad_rows(rows: np.ndarray) -> np.ndarray:
    k = rows.shape[1]
    if k % QK == 0:
        return rows
    out = np.zeros((rows.shape[0], padded(k)), dtype=np.float32)
    out[:, :k] = rows
    return out


def per_channel_scales(rows: np.ndarray) -> np.ndarray:
    """float32 (rows,) per-channel scales, each an f16 value >= max|w|/127."""
    amax = np.abs(rows).max(axis=1).astype(np.float32)
    s = amax / np.float32(127.0)
    d = s.astype(_F16)
    if not np.isfinite(d).all():
        raise QConvertError("a weight row is too large for an f16 scale (|w| > 8.3e6); keep it unquantized with --keep")
    low = d.astype(np.float32) < s
    d[low] = np.nextafter(d[low], _F16.type(np.inf))
    return d.astype(np.float32)


def int8_per_channel(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (rows, k), d float32 (rows,)) of per-channel symmetric int8."""
    d = per_channel_scales(rows)
    safe = np.where(d == 0, np.float32(1.0), d)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return q, d


def encode_int8_q8_0(rows: np.ndarray) -> np.ndarray:
    """Per-channel int8 as Q8_0 bytes (rows, k/32*34); ``rows`` already padded."""
    q, d = int8_per_channel(rows)
    n, k = q.shape
    nb = k // QK
    out = np.empty((n, nb, 34), dtype=np.uint8)
    out[:, :, :2] = d.astype(_F16).view(np.uint8).reshape(n, 1, 2)
    out[:, :, 2:] = q.view(np.uint8).reshape(n, nb, QK)
    return out.reshape(n, nb * 34)


def encode(scheme: str, rows: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """(raw bytes, stored shape) of float32 rows (container orientation) in ``scheme``."""
    if not np.isfinite(rows).all():
        bad = int(rows.size - np.isfinite(rows).sum())
        raise QConvertError(f"a weight has {bad} NaN or infinite values; refusing to quantize it")
    if scheme in ("F32", "F16"):
        return by_name(scheme).quantize(rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1)), rows.shape
    p = pad_rows(rows)
    if scheme == "int8":
        return encode_int8_q8_0(p), p.shape
    return by_name(scheme).quantize(p), p.shape


# --------------------------------------------------------------------------- decoding to integers


def q8_0_parts(raw: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 bytes -> (q int8 (rows, k), d float32 (rows, k/32))."""
    b = np.ascontiguousarray(raw).reshape(n_rows, -1, 34)
    d = b[:, :, :2].copy().view(_F16)[:, :, 0].astype(np.float32)
    q = b[:, :, 2:].copy().view(np.int8).reshape(n_rows, -1)
    return q, d


def q4_0_parts(raw: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 bytes -> (q int8 in -8..7 (rows, k), d float32 (rows, k/32)): x = q·d."""
    b = np.ascontiguousarray(raw).reshape(n_rows, -1, 18)
    d = b[:, :, :2].copy().view(_F16)[:, :, 0].astype(np.float32)
    qs = b[:, :, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int8) - 8
    return q.reshape(n_rows, -1), d


def common_row_scale(d: np.ndarray) -> np.ndarray | None:
    """The per-row scale when every block of each row has the same one, else None."""
    if d.shape[1] == 0 or not (d == d[:, :1]).all():
        return None
    return d[:, 0].copy()
