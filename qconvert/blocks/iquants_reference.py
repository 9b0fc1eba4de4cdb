"""Plain-Python reference for the IQ4_NL / IQ4_XS quantizers.

A line-by-line port of llama.cpp's ``quantize_row_iq4_nl_impl`` (``ggml-quants.c``, as called
by ``quantize_iq4_nl`` / ``quantize_iq4_xs`` with ntry = 7) on numpy float32 *scalars*: every
``+ - * /`` and ``sqrt`` is one float32 operation, in C's order. Slow (milliseconds per block);
it exists to check the numba kernels in :mod:`qconvert.blocks.iquants`, and the tests require
both to give identical bytes. Nothing in qconvert calls it.
"""

from __future__ import annotations

import numpy as np

from .kquants_reference import EPS, f16_round, nearest_int

F = np.float32
KVALUES = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
_KV = [F(v) for v in KVALUES]


def best_index_int8(x) -> int:
    if x <= _KV[0]:
        return 0
    if x >= _KV[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < _KV[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - _KV[mu - 1] < _KV[mu] - x else mu


def _impl(x: list, qw: list | None, super_block_size: int) -> bytes:
    """One IQ4_NL block (32) or IQ4_XS super-block (256) -> its bytes."""
    ntry = 7
    sigma2 = F(0)
    for v in x:
        sigma2 = sigma2 + v * v
    sigma2 = sigma2 * (F(2) / F(super_block_size))
    nb = super_block_size // 32
    scales = [F(0)] * nb
    max_scale, amax_scale = F(0), F(0)
    for ib in range(nb):
        xb = x[32 * ib : 32 * ib + 32]
        if qw is not None:
            w = [qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
        else:
            w = [xb[j] * xb[j] for j in range(32)]
        amax, mx = F(0), F(0)
        for v in xb:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax < EPS:
            scales[ib] = F(0)
            continue
        d = -mx / _KV[0]
        iid = F(1) / d
        sumqx, sumq2 = F(0), F(0)
        for j in range(32):
            q = _KV[best_index_int8(iid * xb[j])]
            sumqx = sumqx + w[j] * q * xb[j]
            sumq2 = sumq2 + w[j] * q * q
        d = sumqx / sumq2 if sumq2 > 0 else F(0)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            iid = F(itry + KVALUES[0]) / mx
            sumqx, sumq2 = F(0), F(0)
            for j in range(32):
                q = _KV[best_index_int8(iid * xb[j])]
                sumqx = sumqx + w[j] * q * xb[j]
                sumq2 = sumq2 + w[j] * q * q
            if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale, max_scale = abs(d), d
    L = [0] * super_block_size
    if nb > 1:
        d = -max_scale / F(32)
        dh, _ = f16_round(d)
        iid = F(1) / d if d != 0 else F(0)
        scales_h, scales_l = 0, [0, 0, 0, 0]
        for ib in range(nb):
            l = max(-32, min(31, nearest_int(iid * scales[ib])))
            dl = d * F(l)
            idl = F(1) / dl if dl != 0 else F(0)
            for j in range(32):
                L[32 * ib + j] = best_index_int8(idl * x[32 * ib + j])
            l += 32
            if ib % 2 == 0:
                scales_l[ib // 2] = l & 0xF
            else:
                scales_l[ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * ib)
        head = bytes([dh & 0xFF, dh >> 8, scales_h & 0xFF, scales_h >> 8, *scales_l])
    else:
        dh, _ = f16_round(scales[0])
        iid = F(1) / scales[0] if scales[0] != 0 else F(0)
        L = [best_index_int8(iid * v) for v in x]
        head = bytes([dh & 0xFF, dh >> 8])
    qs = bytes(L[32 * i + j] | (L[32 * i + 16 + j] << 4) for i in range(super_block_size // 32) for j in range(16))
    return head + qs


def quantize(type_id: int, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(n_rows, n) float32 -> (n_rows, row_bytes) uint8 for IQ4_NL (20) / IQ4_XS (23)."""
    rows = np.asarray(rows, np.float32)
    sbs = 32 if type_id == 20 else 256
    out = []
    for row in rows:
        b = b""
        for s in range(0, row.shape[0], sbs):
            x = [F(v) for v in row[s : s + sbs]]
            qw = None if importance is None else [F(v) for v in importance[s : s + sbs]]
            b += _impl(x, qw, sbs)
        out.append(np.frombuffer(b, np.uint8))
    return np.stack(out)
