"""Kernels for llama.cpp's 4-bit non-linear i-quants IQ4_NL (32-element blocks, 18 bytes) and
IQ4_XS (256-element super-blocks, 136 bytes); layouts in FORMAT.md §7 and blocks/iquants.py.

Every element is ``w = dl * kv[q]`` with kv = kvalues_iq4nl (int8 table), dl = d (IQ4_NL) or
d * (ls - 32) per 32-element sub-block (IQ4_XS), d an IEEE half. ``d * (ls - 32)`` and
``dl * kv[q]`` are exact in float32 (11 + 6 + 7 significant bits at most), so the dequantised
rows equal the codec's bit for bit.

Plain numba loops (no hand-written IR): per 32-element group the row dot forms
t = sum_j kv[q_j] * x_j (sequential float32), then acc += dl * t. Batched products
(T >= SMALL_T) dequantise GEMM_ROWS rows into a float32 tile and use the shared
register-tiled GEMM micro-kernel of ``_ir``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._family import register_family_kernel
from ._ir import GEMM_ROWS, gemm_rows

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
# kind -> (name, block size, type size)
_LAYOUT = {0: ("IQ4_NL", 32, 18), 1: ("IQ4_XS", 256, 136)}


@njit(inline="always")
def _half(lo, hi):
    """Two little-endian bytes of an IEEE half -> float32 (exact)."""
    h = np.int64(lo) | (np.int64(hi) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float64(m) * 2.0**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = np.float64(m | 0x400) * 2.0 ** (e - 25)
    if h & 0x8000:
        v = -v
    return np.float32(v)


@njit(inline="always")
def _group_scales(raw, r, kind, base, dls):
    """Scales of the 32-element groups of the block at byte ``base`` of row ``r`` -> dls;
    returns (number of groups, byte offset of qs)."""
    d = _half(raw[r, base], raw[r, base + 1])
    if kind == 0:
        dls[0] = d
        return 1, 2
    sh = np.int64(raw[r, base + 2]) | (np.int64(raw[r, base + 3]) << 8)
    for ib in range(8):
        ls = ((np.int64(raw[r, base + 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        dls[ib] = d * np.float32(ls - 32)
    return 8, 8


@njit(inline="always")
def _row_dot(raw, r, x, kind, bs, ts, kv):
    nb = x.shape[0] // bs
    dls = np.empty(8, np.float32)
    acc = np.float32(0.0)
    for b in range(nb):
        base = b * ts
        ng, qoff = _group_scales(raw, r, kind, base, dls)
        for g in range(ng):
            t = np.float32(0.0)
            p = base + qoff + 16 * g
            xo = b * bs + 32 * g
            for j in range(16):
                q = raw[r, p + j]
                t += kv[q & 0xF] * x[xo + j]
                t += kv[q >> 4] * x[xo + 16 + j]
            acc += dls[g] * t
    return acc


@njit(inline="always")
def _dequant_row(raw, r, out, o, n, kind, bs, ts, kv):
    dls = np.empty(8, np.float32)
    for b in range(n // bs):
        base = b * ts
        ng, qoff = _group_scales(raw, r, kind, base, dls)
        for g in range(ng):
            p = base + qoff + 16 * g
            e = b * bs + 32 * g
            for j in range(16):
                q = raw[r, p + j]
                out[o, e + j] = dls[g] * kv[q & 0xF]
                out[o, e + 16 + j] = dls[g] * kv[q >> 4]


@njit(cache=True, parallel=True)
def _matvec(raw, x, out, kind, bs, ts):
    kv = KVALUES.copy()
    for r in prange(raw.shape[0]):
        out[r] = _row_dot(raw, r, x, kind, bs, ts, kv)


@njit(cache=True, parallel=True)
def _dequant_rows(raw, ids, out, kind, bs, ts):
    kv = KVALUES.copy()
    n = out.shape[1]
    for i in prange(ids.shape[0]):
        _dequant_row(raw, ids[i], out, i, n, kind, bs, ts, kv)


@njit(cache=True, parallel=True)
def _matmul(raw, Xp, t_valid, n_in, out, kind, bs, ts):
    kv = KVALUES.copy()
    n_out = raw.shape[0]
    k_pad = Xp.shape[1]
    G = GEMM_ROWS
    for g in prange((n_out + G - 1) // G):
        r0 = g * G
        nr = min(G, n_out - r0)
        buf = np.zeros((G, k_pad), np.float32)
        for i in range(nr):
            _dequant_row(raw, r0 + i, buf, i, n_in, kind, bs, ts, kv)
        gemm_rows(buf, nr, Xp, t_valid, out, r0)


def _register(kind: int) -> None:
    name, bs, ts = _LAYOUT[kind]
    register_family_kernel(
        name,
        bs,
        ts,
        lambda raw, x, out: _matvec(raw, x, out, kind, bs, ts),
        lambda raw, Xp, T, n_in, out: _matmul(raw, Xp, T, n_in, out, kind, bs, ts),
        lambda raw, ids, out: _dequant_rows(raw, ids, out, kind, bs, ts),
    )


for _kind in _LAYOUT:
    _register(_kind)
