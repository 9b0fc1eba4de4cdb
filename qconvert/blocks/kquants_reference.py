"""Plain-Python reference for the K-quant quantizers (and the legacy types' imatrix paths).

A line-by-line port of llama.cpp's ``ggml-quants.c`` search code on numpy float32 *scalars*
(every ``+ - * /`` and ``sqrt`` is one float32 operation, in C's order), one super-block at a
time. It is slow (milliseconds per block) and exists to check the fast numba kernels in
:mod:`qconvert.blocks.kquants`, which restructure the same arithmetic to run many sub-blocks
at once; the tests require both to give identical bytes. Nothing in qconvert calls it.
"""

from __future__ import annotations

import numpy as np

F = np.float32
QK_K = 256
EPS = F(1e-15)  # GROUP_MAX_EPS
_MAGIC = F(12582912.0)


def nearest_int(v) -> int:
    """llama.cpp nearest_int: bits(v + 1.5*2^23) & 0x7FFFFF, minus 0x400000."""
    b = int((F(v) + _MAGIC).view(np.int32))
    return (b & 0x7FFFFF) - 0x400000


def f16_round(v) -> tuple[int, F]:
    """(binary16 bits, float32 value) of f16(v), round to nearest even."""
    with np.errstate(over="ignore"):
        h = np.float16(F(v))
    return int(h.view(np.uint16)), F(h)


def _u8(v: int) -> int:
    return v & 0xFF


def _i8(v: int) -> int:
    v &= 0xFF
    return v - 256 if v >= 128 else v


# --- searches ------------------------------------------------------------------------------


def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """rmse_type 1 only (the one every caller uses); L gets values + nmax."""
    assert rmse_type == 1
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = qw[i] if qw is not None else x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(is_)) / mx
        sumlx = suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = qw[i] if qw is not None else x[i] * x[i]
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


def make_q3_quants(n, nmax, x, L):
    """make_q3_quants with do_rmse = true."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / mx
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F(L[i])
            if slx > 0:
                sl2 = suml2 - w * F(L[i]) * F(L[i])
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else F(0)


def make_qkx_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants (and make_qkx3_quants with explicit weights): returns (scale, -min)."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F(0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    Laux = [0] * n
    for is_ in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(is_) + F(nmax)) / (mx - mn)
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l += w * F(l)
            sum_l2 += w * F(l) * F(l)
            sum_xl += w * F(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                L[:n] = Laux
                best_error = cur_error
                scale = this_scale
                mn = this_min  # later steps use the new min (C reuses the variable)
    return scale, -mn


def make_qp_quants(n, nmax, x, L, quant_weights):
    """L holds uint8 values (C's narrowing stores)."""
    mx = F(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / mx
    for i in range(n):
        L[i] = _u8(nearest_int(iscale * x[i]))
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += quant_weights[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + F(nmax)) / mx
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = suml2 = F(0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = _u8(l)
        w = quant_weights[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = _u8(new_l)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return sumlx / suml2 if suml2 > 0 else F(0)


# --- per super-block quantizers -----------------------------------------------------------------


def _put_f16(y: bytearray, pos: int, v) -> F:
    h, val = f16_round(v)
    y[pos] = h & 0xFF
    y[pos + 1] = h >> 8
    return val


def _pack_2bit(y, pos, L):
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[pos + j // 4 + l] = _u8(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6))


def _sum_sq(x, n):
    s = F(0)
    for i in range(n):
        s += x[i] * x[i]
    return s


def q2_k_block(x, qw=None) -> bytes:
    """quantize_row_q2_K_ref (qw None) or quantize_row_q2_K_impl; layout scales[16] qs[64] d dmin."""
    y = bytearray(84)
    L = [0] * QK_K
    scales = [F(0)] * 16
    mins = [F(0)] * 16
    if qw is None:
        max_scale = F(0)
        max_min = F(0)
        for j in range(16):
            xs = x[16 * j : 16 * j + 16]
            w = [abs(v) for v in xs]
            Lj = [0] * 16
            scales[j], mins[j] = make_qkx_quants(16, 3, xs, w, Lj, -0.5, 0.1, 15, True)
            L[16 * j : 16 * j + 16] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            iscale = F(15) / max_scale
            for j in range(16):
                y[j] = _u8(nearest_int(iscale * scales[j]))
            dq = _put_f16(y, 80, max_scale / F(15))
        else:
            dq = _put_f16(y, 80, F(0))
        if max_min > 0:
            iscale = F(15) / max_min
            for j in range(16):
                y[j] = _u8(y[j] | (nearest_int(iscale * mins[j]) << 4))
            mq = _put_f16(y, 82, max_min / F(15))
        else:
            mq = _put_f16(y, 82, F(0))
    else:
        sigma2 = _sum_sq(x, QK_K) / F(QK_K)
        sw = [F(0)] * 16
        for j in range(16):
            w = [qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]) for l in range(16)]
            for l in range(16):
                sw[j] += w[l]
            Lj = [0] * 16
            scales[j], mins[j] = make_qkx_quants(16, 3, x[16 * j : 16 * j + 16], w, Lj, -0.9, 0.05, 36, False)
            L[16 * j : 16 * j + 16] = Lj
        Ls = [0] * 16
        Lm = [0] * 16
        dm = make_qp_quants(16, 15, scales, Ls, sw)
        mm = make_qp_quants(16, 15, mins, Lm, sw)
        dq = _put_f16(y, 80, dm)
        mq = _put_f16(y, 82, mm)
        for j in range(16):
            y[j] = _u8(Ls[j] | (Lm[j] << 4))
    for j in range(16):
        d = dq * F(y[j] & 0xF)
        if not d:
            continue
        dm = mq * F(y[j] >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int((x[16 * j + ii] + dm) / d)))
    _pack_2bit(y, 16, L)
    return bytes(y)


def _q3_pack_scale(y, j, l):
    if j < 8:
        y[96 + j] = l & 0xF
    else:
        y[96 + j - 8] |= (l & 0xF) << 4
    l >>= 4
    y[96 + 8 + j % 4] |= l << (2 * (j // 4))


def q3_k_block(x, qw=None) -> bytes:
    """quantize_row_q3_K_ref / _impl; layout hmask[32] qs[64] scales[12] d."""
    y = bytearray(110)
    L = [0] * QK_K
    scales = [F(0)] * 16
    if qw is None:
        max_scale = F(0)
        amax = F(0)
        for j in range(16):
            Lj = [0] * 16
            scales[j] = make_q3_quants(16, 4, x[16 * j : 16 * j + 16], Lj)
            L[16 * j : 16 * j + 16] = Lj
            if abs(scales[j]) > amax:
                amax = abs(scales[j])
                max_scale = scales[j]
        if max_scale:
            iscale = F(-32) / max_scale
            for j in range(16):
                l = _i8(nearest_int(iscale * scales[j]))
                _q3_pack_scale(y, j, max(-32, min(31, l)) + 32)
            dq = _put_f16(y, 108, F(1) / iscale)
        else:
            dq = _put_f16(y, 108, F(0))
    else:
        sigma2 = F(2) * _sum_sq(x, QK_K) / F(QK_K)
        sw = [F(0)] * 16
        for j in range(16):
            w = [qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]) for l in range(16)]
            s = F(0)
            for l in range(16):
                s += w[l]
            sw[j] = s
            Lj = [0] * 16
            scales[j] = make_qx_quants(16, 4, x[16 * j : 16 * j + 16], Lj, 1, w)
            L[16 * j : 16 * j + 16] = Lj
        Ls = [0] * 16
        d_block = make_qx_quants(16, 32, scales, Ls, 1, sw)
        for j in range(16):
            _q3_pack_scale(y, j, Ls[j])
        dq = _put_f16(y, 108, d_block)
    for j in range(16):
        sc = (y[96 + j] & 0xF) if j < 8 else (y[96 + j - 8] >> 4)
        sc = (sc | (((y[104 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        d = dq * F(sc)
        if not d:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(x[16 * j + ii] / d))) + 4
    m, hm = 0, 1
    for j in range(QK_K):
        if L[j] > 3:
            y[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m, hm = 0, hm << 1
    _pack_2bit(y, 32, L)
    return bytes(y)


def _k4_pack(y, Ls, Lm):
    for j in range(8):
        ls, lm = Ls[j], Lm[j]
        if j < 4:
            y[4 + j] = ls
            y[4 + j + 4] = lm
        else:
            y[4 + j + 4] = _u8((ls & 0xF) | ((lm & 0xF) << 4))
            y[4 + j - 4] = _u8(y[4 + j - 4] | ((ls >> 4) << 6))
            y[4 + j] = _u8(y[4 + j] | ((lm >> 4) << 6))


def _k4_get(y, j):
    q = y[4:16]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def q45_k_block(x, nmax, qw=None) -> bytes:
    """Q4_K (nmax 15, 144 bytes) / Q5_K (nmax 31, 176 bytes): _ref or _impl."""
    y = bytearray(144 if nmax == 15 else 176)
    L = [0] * QK_K
    scales = [F(0)] * 8
    mins = [F(0)] * 8
    Ls = [0] * 8
    Lm = [0] * 8
    if qw is None:
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        max_scale = F(0)
        max_min = F(0)
        for j in range(8):
            xs = x[32 * j : 32 * j + 32]
            av_x = np.sqrt(_sum_sq(xs, 32) / F(32))
            w = [av_x + abs(v) for v in xs]
            Lj = [0] * 32
            scales[j], mins[j] = make_qkx_quants(32, nmax, xs, w, Lj, rmin, 0.1, nstep, False)
            L[32 * j : 32 * j + 32] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        for j in range(8):
            Ls[j] = min(63, _u8(nearest_int(inv_scale * scales[j])))
            Lm[j] = min(63, _u8(nearest_int(inv_min * mins[j])))
        d_block = max_scale / F(63)
        m_block = max_min / F(63)
    else:
        sigma2 = F(2) * _sum_sq(x, QK_K) / F(QK_K)
        sw = [F(0)] * 8
        for j in range(8):
            w = [qw[32 * j + l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]) for l in range(32)]
            s = F(0)
            for l in range(32):
                s += w[l]
            sw[j] = s
            Lj = [0] * 32
            scales[j], mins[j] = make_qkx_quants(32, nmax, x[32 * j : 32 * j + 32], w, Lj, -0.9, 0.05, 36, False)
            L[32 * j : 32 * j + 32] = Lj
        d_block = make_qp_quants(8, 63, scales, Ls, sw)
        m_block = make_qp_quants(8, 63, mins, Lm, sw)
        if nmax == 31:
            Ls = [min(63, v) for v in Ls]
            Lm = [min(63, v) for v in Lm]
    _k4_pack(y, Ls, Lm)
    dq = _put_f16(y, 0, d_block)
    mq = _put_f16(y, 2, m_block)
    for j in range(8):
        sc, m = _k4_get(y, j)
        d = dq * F(sc)
        if not d:
            continue
        dm = mq * F(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / d)))
    if nmax == 15:
        for h in range(4):
            for l in range(32):
                y[16 + 32 * h + l] = L[64 * h + l] | (L[64 * h + l + 32] << 4)
    else:
        m1, m2 = 1, 2
        for h in range(4):
            for j in range(32):
                l1, l2 = L[64 * h + j], L[64 * h + j + 32]
                if l1 > 15:
                    l1 -= 16
                    y[16 + j] |= m1
                if l2 > 15:
                    l2 -= 16
                    y[16 + j] |= m2
                y[48 + 32 * h + j] = l1 | (l2 << 4)
            m1 <<= 2
            m2 <<= 2
    return bytes(y)


def q6_k_block(x, qw=None) -> bytes:
    """quantize_row_q6_K_ref / _impl; layout ql[128] qh[64] scales[16] d."""
    y = bytearray(210)
    L = [0] * QK_K
    scales = [F(0)] * 16
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        Lj = [0] * 16
        w = None if qw is None else qw[16 * ib : 16 * ib + 16]
        scales[ib] = make_qx_quants(16, 32, x[16 * ib : 16 * ib + 16], Lj, 1, w)
        L[16 * ib : 16 * ib + 16] = Lj
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < EPS:
        return bytes(y)
    iscale = F(-128) / max_scale
    dq = _put_f16(y, 208, F(1) / iscale)
    for ib in range(16):
        y[192 + ib] = _u8(min(127, nearest_int(iscale * scales[ib])))
    for j in range(16):
        d = dq * F(_i8(y[192 + j]))
        if not d:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / d))) + 32
    for h in range(2):
        for l in range(32):
            a, b, c, e = (L[128 * h + l + 32 * k] for k in range(4))
            y[64 * h + l] = (a & 0xF) | ((c & 0xF) << 4)
            y[64 * h + l + 32] = (b & 0xF) | ((e & 0xF) << 4)
            y[128 + 32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return bytes(y)


def q8_k_block(x) -> bytes:
    """quantize_row_q8_K_ref: d f32, qs i8[256], bsums i16[16] (all zero for an all-zero block)."""
    mx = F(0)
    amax = F(0)
    for j in range(QK_K):
        if abs(x[j]) > amax:
            amax = abs(x[j])
            mx = x[j]
    if not amax:
        return bytes(292)
    iscale = F(-127) / mx
    q = [min(127, nearest_int(iscale * x[j])) for j in range(QK_K)]
    bsums = [sum(q[16 * j : 16 * j + 16]) for j in range(16)]
    return (
        np.array([F(1) / iscale], "<f4").tobytes()
        + np.array(q, np.int8).tobytes()
        + np.array(bsums, "<i2").tobytes()
    )


_BLOCK = {
    10: q2_k_block,
    11: q3_k_block,
    12: lambda x, qw=None: q45_k_block(x, 15, qw),
    13: lambda x, qw=None: q45_k_block(x, 31, qw),
    14: q6_k_block,
}


def quantize_k(type_id: int, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Reference for :func:`qconvert.blocks.kquants.quantize_k` (same arguments and result)."""
    rows = np.asarray(rows, np.float32)
    n_rows, n = rows.shape
    assert n % QK_K == 0
    out = []
    with np.errstate(all="ignore"):
        for r in range(n_rows):
            row = b""
            for b in range(n // QK_K):
                x = list(rows[r, QK_K * b : QK_K * (b + 1)])
                if type_id == 15:
                    row += q8_k_block(x)
                else:
                    qw = None if importance is None else list(np.asarray(importance, np.float32)[QK_K * b : QK_K * (b + 1)])
                    row += _BLOCK[type_id](x, qw)
            out.append(np.frombuffer(row, np.uint8))
    return np.stack(out) if out else np.zeros((0, 0), np.uint8)


def quantize_legacy_imatrix(type_id: int, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_impl / q4_1 / q5_0 / q5_1 with quant_weights (no re-quantization)."""
    rows = np.asarray(rows, np.float32)
    imp = list(np.asarray(importance, np.float32))
    out = []
    with np.errstate(all="ignore"):
        for r in range(rows.shape[0]):
            x = list(rows[r])
            n = len(x)
            sigma2 = _sum_sq(x, n) / F(n)
            row = bytearray()
            for ib in range(n // 32):
                xb = x[32 * ib : 32 * ib + 32]
                w = [imp[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
                L = [0] * 32
                blk = bytearray()
                if type_id in (2, 6):
                    d = make_qx_quants(32, 8 if type_id == 2 else 16, xb, L, 1, w)
                    blk += f16_round(d)[0].to_bytes(2, "little")
                else:
                    d, the_min = make_qkx_quants(32, 15 if type_id == 3 else 31, xb, w, L, -0.9, 0.05, 36, False)
                    blk += f16_round(d)[0].to_bytes(2, "little") + f16_round(-the_min)[0].to_bytes(2, "little")
                if type_id in (6, 7):
                    qh = sum(((L[j] >> 4) & 1) << j for j in range(32))
                    blk += qh.to_bytes(4, "little")
                blk += bytes((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4) for j in range(16))
                row += blk
            out.append(np.frombuffer(bytes(row), np.uint8))
    return np.stack(out)
