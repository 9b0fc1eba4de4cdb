"""GGML's K-quants: 256-element super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (and Q8_K).

Byte-identical with llama.cpp (``ggml-quants.c``): without an importance vector the
quantizers are ``quantize_row_qX_K_ref`` (what ``llama-quantize`` writes without an imatrix),
with one they are the imatrix paths ``quantize_row_qX_K_impl`` (``quantize_qX_K`` with
``quant_weights``). The numba kernels below run each search on many sub-blocks at once (SIMD
across sub-blocks, every sub-block's arithmetic still in C's order);
``qconvert/blocks/kquants_reference.py`` is a line-by-line plain-Python port of the C code,
and the tests require identical bytes from both (and from llama.cpp itself, when installed).

Exactness rules (what makes the bytes equal, not just close):

- All arithmetic is float32, one rounding per operation, in C's evaluation order
  (left to right, ``w*x*l`` = ``(w*x)*l``), no fused multiply-add, every sum accumulated
  sequentially from element 0. Integers meeting floats are converted to float32 first.
- ``nearest_int(v)``: ``bits(v + 12582912.0f) & 0x7FFFFF) - 0x400000`` (the 1.5*2^23 trick;
  round half to even for |v| <= 2^22, and the same bit arithmetic, emulated exactly, beyond).
- ``f16(v)`` rounds to nearest even (overflow -> inf); a scale stored as f16 is read back as
  ``f32(f16(v))`` before the final re-quantization of every element, as llama.cpp does.
- ``GROUP_MAX_EPS = 1e-15f``; C integer narrowing (``uint8_t``/``int8_t`` stores) is emulated.

Search primitives (n elements x, weights w):

- ``make_qx_quants(n, nmax, x, w)`` (symmetric): max = the first x with the largest |x|
  (sign kept); if |max| < eps all L = 0, scale 0. iscale = -nmax/max;
  l = clamp(nearest_int(iscale*x), -nmax, nmax-1); w = x*x when no weights are given;
  scale = sum(w*x*l)/sum(w*l*l), best = scale*sum(w*x*l). Then for is in -9..9, is != 0:
  iscale = -(nmax + 0.1*is)/max, same sums; take it when suml2 > 0 and
  sumlx^2 > best*suml2. L stored as l + nmax.
- ``make_q3_quants(16, 4, x)`` (Q3_K without imatrix): the first rounding of make_qx_quants
  with w = x*x, then up to 5 sweeps: for each i, slx = sumlx - w*x*L[i]; if slx > 0:
  sl2 = suml2 - w*L[i]^2, new = clamp(nearest_int(x*sl2/slx)); if new != L[i] and, with
  slx += w*x*new, sl2 += w*new^2, sl2 > 0 and slx*slx*suml2 > sumlx*sumlx*sl2, accept. Stop
  after a sweep with no change. Scale = sumlx/suml2 (0 if suml2 <= 0); L stored + nmax.
- ``make_qkx2/qkx3_quants(n, nmax, x, w, rmin, rdelta, nstep, use_mad)`` (scale and min):
  min = min(x, 0), max = max(x); sum_w, sum_x = sum(w), sum(w*x). If max == min: L = 0,
  scale 0. iscale = nmax/(max-min), scale = 1/iscale, L = clamp(nearest_int(iscale*(x-min)),
  0, nmax), best = sum(w*err) with err = |scale*L + min - x| (use_mad) or its square. For
  is in 0..nstep: iscale = (rmin + rdelta*is + nmax)/(max-min) and
  L' = clamp(nearest_int(iscale*(x-min)), 0, nmax), where ``min`` is the best min found so
  far (llama.cpp reuses the variable, so an accepted step moves later steps' grid), then
  D = sum_w*sum_l2 - sum_l^2; if D > 0: scale' = (sum_w*sum_xl - sum_x*sum_l)/D,
  min' = (sum_l2*sum_x - sum_l*sum_xl)/D, if min' > 0: min' = 0, scale' = sum_xl/sum_l2;
  take it when its error < best. Returns scale and -min (>= 0).
- ``make_qp_quants(n, nmax, x, w)`` (x >= 0, for sub-block scales): max = max(x, 0); if
  max < eps: 0. iscale = nmax/max; best = sum(w*(x - L/iscale)^2) with L = nearest_int(iscale*x);
  for is in -4..4, is != 0: iscale' = (0.1*is + nmax)/max, L = min(nmax, nearest_int(iscale'*x)),
  keep the iscale with the smallest weighted error; then L = min(nmax, nearest_int(iscale*x))
  and up to 5 coordinate-descent sweeps as in make_q3_quants (new = min(nmax,
  nearest_int(x*sl2/slx)), both slx > 0 and sl2 > 0 required). Returns sumlx/suml2.

Per type, per super-block of 256 (no importance):

- Q2_K: 16 sub-blocks of 16: qkx2(16, 3, w = |x|, -0.5, 0.1, 15, mad) -> scale_j, min_j.
  d = max scale/15, sc_j = nearest_int(15*scale_j/max scale); dmin and m_j likewise from the
  mins (0 where the max is 0). Re-quantize: for each j with D = f16(d)*sc_j != 0,
  L = clamp(nearest_int((x + f16(dmin)*m_j)/D), 0, 3).
- Q3_K: make_q3_quants per 16; max_scale = the scale with the largest |.|; iscale =
  -32/max_scale; sc_j = clamp(int8(nearest_int(iscale*scale_j)), -32, 31) + 32; d = f16(1/iscale).
  Re-quantize with D = f16(d)*(sc_j - 32): L = clamp(nearest_int(x/D), -4, 3) + 4.
- Q4_K / Q5_K: 8 sub-blocks of 32: w = sqrt(sum(x^2)/32) + |x|; qkx2(32, 15|31, w,
  -1|-0.5, 0.1, 20|15, squares). ls_j = min(63, nearest_int(63/max_scale*scale_j)) (0 if
  max_scale = 0), lm_j likewise; d = f16(max_scale/63), dmin = f16(max_min/63). Re-quantize
  with D = f16(d)*ls_j, M = f16(dmin)*lm_j: L = clamp(nearest_int((x + M)/D), 0, 15|31).
- Q6_K: make_qx_quants(16, 32, w = x*x) per 16; max_scale = the scale with the largest |.|; if
  its |.| < eps the block is all zero bytes; iscale = -128/max_scale; d = f16(1/iscale);
  sc_j = min(127, nearest_int(iscale*scale_j)); L = clamp(nearest_int(x/(f16(d)*sc_j)), -32, 31) + 32.
- Q8_K: d = f32 1/iscale, iscale = -127/max (max signed, largest |x|), q = min(127,
  nearest_int(iscale*x)), bsums = sums of 16 q; an all-zero block is all zero bytes.

In every type a sub-block whose re-quantization scale D is 0 keeps the L of its search.

With an importance vector imp (one weight per column; llama.cpp's imatrix):

- Q2_K: sigma2 = sum(x^2)/256 over the super-block; w = imp*sqrt(sigma2 + x^2); qkx3(16, 3, w,
  -0.9, 0.05, 36, squares); d, dmin = make_qp_quants(16, 15, scales|mins, sw) (sw_j = sum of
  the sub-block's w); re-quantize as above.
- Q3_K: sigma2 = 2*sum(x^2)/256; w = imp*sqrt(sigma2 + x^2); make_qx_quants(16, 4, w);
  d = make_qx_quants(16, 32, scales, sw) with sc_j = its L; re-quantize as above.
- Q4_K / Q5_K: sigma2 = 2*sum(x^2)/256; w = imp*sqrt(sigma2 + x^2); qkx3(32, 15|31, w, -0.9,
  0.05, 36, squares); d, dmin = make_qp_quants(8, 63, scales|mins, sw); re-quantize.
- Q6_K: make_qx_quants(16, 32, w = imp) per 16, then as without importance.
- Legacy types (used by legacy.py): sigma2 = sum(x^2)/row_length over the whole row,
  w = imp*sqrt(sigma2 + x^2); Q4_0/Q5_0: make_qx_quants(32, 8|16, w), store f16(scale) and L;
  Q4_1/Q5_1: qkx3(32, 15|31, w, -0.9, 0.05, 36, squares), store f16(scale), f16(-min), L.
  (No re-quantization with the f16 scale on these paths.)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import QConvertError
from .registry import BlockType, register

QK_K = 256
_F16 = np.dtype("<f2")

# float32 constants: numba freezes global numpy scalars with their dtype, so arithmetic with
# them stays float32 (a bare Python float would promote to float64).
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_P01 = np.float32(0.1)
_TWO24 = np.float32(16777216.0)
_INV_TWO24 = np.float32(2.0**-24)
_RMIN_Q2 = np.float32(-0.5)
_RMIN_Q4 = np.float32(-1.0)
_RMIN_Q5 = np.float32(-0.5)
_RMIN_IMAT = np.float32(-0.9)
_RDELTA = np.float32(0.1)
_RDELTA_IMAT = np.float32(0.05)
_F15 = np.float32(15.0)
_F63 = np.float32(63.0)
_F256 = np.float32(256.0)
_F32 = np.float32(32.0)


# ---------------------------------------------------------------------------------------
# bit-exact scalar primitives


@intrinsic
def _f32_bits(typingctx, v):
    """float32 -> its IEEE bits as int32 (a plain bitcast)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, v):
    """int32 bits -> float32 (a plain bitcast)."""
    if v != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always")
def _nearest_int(v):
    """llama.cpp's nearest_int: the 1.5*2^23 trick, bit for bit (also for |v| > 2^22)."""
    b = _f32_bits(v + _MAGIC)
    return np.int64(b & 0x007FFFFF) - 0x00400000


@njit(inline="always")
def _f16_bits(f):
    """float32 -> IEEE binary16 bits, round to nearest even, overflow to inf (ggml's rule)."""
    u = np.int64(_f32_bits(f)) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # normal half
        r = a - 0x38000000
        return sign | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    # subnormal half or zero: |f| * 2^24 is exact and <= 1024; round it to an integer
    return sign | _nearest_int(abs(f) * _TWO24)


@njit(inline="always")
def _half_f32(h):
    """IEEE binary16 bits -> float32, exact."""
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    if em < 0x0400:  # zero or subnormal: em * 2^-24 is exact
        bits = (np.int64(_f32_bits(np.float32(em) * _INV_TWO24)) & 0x7FFFFFFF) | sign
    elif em >= 0x7C00:
        bits = sign | 0x7F800000 | ((em & 0x3FF) << 13)
    else:
        bits = sign | ((em << 13) + 0x38000000)
    if bits >= 0x80000000:
        bits -= 0x100000000
    return _bits_f32(np.int32(bits))


@njit(inline="always")
def _store_f16(out, pos, f):
    """Write f16(f) at out[pos:pos+2] and return f32(f16(f))."""
    h = _f16_bits(f)
    out[pos] = np.uint8(h & 0xFF)
    out[pos + 1] = np.uint8(h >> 8)
    return _half_f32(h)


# ---------------------------------------------------------------------------------------
# The searches, run on many groups ("lanes") at once.
#
# A lane is one group of n elements (a sub-block). Lane data are laid out (n, lanes): element
# i of every lane is contiguous, so each step of a search is a loop over lanes that LLVM turns
# into SIMD code, while every lane still performs its own float32 operations in exactly C's
# order (sums run over i sequentially, per lane). Per-lane scalars live in 1-D arrays. The
# lane count is a run-time value (many super-blocks at once): a short constant trip count
# would be fully unrolled and stay scalar. Branches become selects; lanes that C leaves early
# (all-zero groups) are computed anyway and overwritten at the end.


@intrinsic
def _nint_f(typingctx, v):
    """float32(nearest_int(v)) for any float32 v: the bit trick, in integer SIMD-able IR."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        f = builder.fadd(args[0], ir.Constant(ir.FloatType(), 12582912.0))
        i = builder.bitcast(f, ir.IntType(32))
        i = builder.sub(builder.and_(i, ir.Constant(ir.IntType(32), 0x7FFFFF)), ir.Constant(ir.IntType(32), 0x400000))
        return builder.sitofp(i, ir.FloatType())

    return types.float32(types.float32), codegen


@njit(inline="always")
def _clampf(v, lo, hi):
    return min(max(v, lo), hi)


@njit(inline="always")
def _lane_state(lanes):
    """Per-lane scratch: a tuple of separate float32 arrays (separate, so LLVM can tell them apart)."""
    return (
        np.empty(lanes, np.float32), np.empty(lanes, np.float32), np.empty(lanes, np.float32),
        np.empty(lanes, np.float32), np.empty(lanes, np.float32), np.empty(lanes, np.float32),
        np.empty(lanes, np.float32), np.empty(lanes, np.float32), np.empty(lanes, np.float32),
        np.empty(lanes, np.float32), np.empty(lanes, np.float32), np.empty(lanes, np.float32),
        np.empty(lanes, np.float32), np.empty(lanes, np.float32), np.empty(lanes, np.float32),
        np.empty(lanes, np.float32), np.empty(lanes, np.bool_), np.empty(lanes, np.bool_),
    )  # fmt: skip


@njit(inline="always")
def _lanes_absmax(n, G, xt, amax, mxs):
    """Per lane: the first element with the largest |x| (signed) and that |x|."""
    for j in range(G):
        amax[j] = _F0
        mxs[j] = _F0
    for i in range(n):
        for j in range(G):
            v = xt[i, j]
            ax = abs(v)
            take = ax > amax[j]
            mxs[j] = v if take else mxs[j]
            amax[j] = ax if take else amax[j]


@njit(inline="always")
def _lanes_qx(n, G, nmax, xt, wt, use_w, L, S, scale):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, w) per lane (w = x*x when not use_w).
    L[i, lane] = stored quant (0..2*nmax-1, or 0 for an all-zero lane); scale[lane]."""
    amax, mxs, isc, sumlx, suml2, best, lisc = S[0], S[1], S[2], S[3], S[4], S[5], S[6]
    fnmax = np.float32(nmax)
    lo = -fnmax
    hi = fnmax - _F1
    _lanes_absmax(n, G, xt, amax, mxs)
    for k in range(19):  # is = 0 (the first rounding, done before C's loop), then -9..-1, 1..9
        is_ = 0 if k == 0 else (k - 10 if k <= 9 else k - 9)
        if is_ == 0:
            step = -fnmax
        else:
            step = -(fnmax + _P01 * np.float32(is_))
        for j in range(G):
            isc[j] = step / mxs[j]
            sumlx[j] = _F0
            suml2[j] = _F0
        for i in range(n):
            for j in range(G):
                v = xt[i, j]
                l = _clampf(_nint_f(isc[j] * v), lo, hi)
                w = wt[i, j] if use_w else v * v
                wl = w * v * l
                sumlx[j] += wl
                suml2[j] += w * l * l
        if is_ == 0:
            for j in range(G):
                sc = sumlx[j] / suml2[j] if suml2[j] != _F0 else _F0
                scale[j] = sc
                best[j] = sc * sumlx[j]
                lisc[j] = isc[j]
        else:
            for j in range(G):
                ok = suml2[j] > _F0 and sumlx[j] * sumlx[j] > best[j] * suml2[j]
                sc = sumlx[j] / suml2[j]
                scale[j] = sc if ok else scale[j]
                best[j] = sc * sumlx[j] if ok else best[j]
                lisc[j] = isc[j] if ok else lisc[j]
    for i in range(n):
        for j in range(G):
            L[i, j] = _clampf(_nint_f(lisc[j] * xt[i, j]), lo, hi) + fnmax
    for j in range(G):
        if amax[j] < _EPS:
            scale[j] = _F0
            for i in range(n):
                L[i, j] = _F0


@njit(inline="always")
def _lanes_q3(n, G, nmax, xt, L, S, scale):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) per lane (weights x*x)."""
    amax, mxs, isc, sumlx, suml2, chg = S[0], S[1], S[2], S[3], S[4], S[16]
    fnmax = np.float32(nmax)
    lo = -fnmax
    hi = fnmax - _F1
    _lanes_absmax(n, G, xt, amax, mxs)
    for j in range(G):
        isc[j] = -fnmax / mxs[j]
        sumlx[j] = _F0
        suml2[j] = _F0
    for i in range(n):
        for j in range(G):
            v = xt[i, j]
            l = _clampf(_nint_f(isc[j] * v), lo, hi)
            L[i, j] = l
            w = v * v
            sumlx[j] += w * v * l
            suml2[j] += w * l * l
    for _itry in range(5):
        for j in range(G):
            chg[j] = False
        for i in range(n):
            for j in range(G):
                v = xt[i, j]
                w = v * v
                li = L[i, j]
                slx = sumlx[j] - w * v * li
                sl2 = suml2[j] - w * li * li
                nl = _clampf(_nint_f(v * sl2 / slx), lo, hi)
                slx2 = slx + w * v * nl
                sl22 = sl2 + w * nl * nl
                ok = (slx > _F0) & (nl != li) & (sl22 > _F0) & (slx2 * slx2 * suml2[j] > sumlx[j] * sumlx[j] * sl22)
                L[i, j] = nl if ok else li
                sumlx[j] = slx2 if ok else sumlx[j]
                suml2[j] = sl22 if ok else suml2[j]
                chg[j] = chg[j] | ok
        # a lane whose sweep changed nothing is at a fixed point: more sweeps leave it alone
        any_chg = False
        for j in range(G):
            any_chg = any_chg | chg[j]
        if not any_chg:
            break
    for j in range(G):
        scale[j] = sumlx[j] / suml2[j] if suml2[j] > _F0 else _F0
    for i in range(n):
        for j in range(G):
            L[i, j] += fnmax
    for j in range(G):
        if amax[j] < _EPS:
            scale[j] = _F0
            for i in range(n):
                L[i, j] = _F0


@njit(inline="always")
def _lanes_qkx(n, G, nmax, xt, wt, L, S, rmin, rdelta, nstep, use_mad, scale, the_min):
    """make_qkx2_quants / make_qkx3_quants (explicit weights) per lane: L in 0..nmax,
    scale[lane], the_min[lane] (= -min >= 0)."""
    mn, mx, sw, sx, isc, best = S[0], S[1], S[2], S[3], S[4], S[5]
    sl, sl2, sxl, ts, tm, cur, lisc, lmn, mn0 = S[6], S[7], S[8], S[9], S[10], S[11], S[12], S[13], S[14]
    acc = S[16]
    fnmax = np.float32(nmax)
    for j in range(G):
        v = xt[0, j]
        mn[j] = v
        mx[j] = v
        sw[j] = wt[0, j]
        sx[j] = wt[0, j] * v
    for i in range(1, n):
        for j in range(G):
            v = xt[i, j]
            w = wt[i, j]
            mn[j] = v if v < mn[j] else mn[j]
            mx[j] = v if v > mx[j] else mx[j]
            sw[j] += w
            sx[j] += w * v
    for j in range(G):
        m = mn[j] if mn[j] < _F0 else _F0  # if (min > 0) min = 0
        mn[j] = m
        mn0[j] = m
        isc[j] = fnmax / (mx[j] - m)
        scale[j] = _F1 / isc[j]
        best[j] = _F0
        lisc[j] = isc[j]
        lmn[j] = m
    for i in range(n):
        for j in range(G):
            v = xt[i, j]
            l = _clampf(_nint_f(isc[j] * (v - mn[j])), _F0, fnmax)
            diff = scale[j] * l + mn[j] - v
            diff = abs(diff) if use_mad else diff * diff
            best[j] += wt[i, j] * diff
    for is_ in range(nstep + 1):
        step = rmin + rdelta * np.float32(is_) + fnmax
        for j in range(G):
            # mn is the best min so far: C reuses the variable, so later grids move with it
            isc[j] = step / (mx[j] - mn[j])
            sl[j] = _F0
            sl2[j] = _F0
            sxl[j] = _F0
        for i in range(n):
            for j in range(G):
                v = xt[i, j]
                l = _clampf(_nint_f(isc[j] * (v - mn[j])), _F0, fnmax)
                wl = wt[i, j] * l
                sl[j] += wl
                sl2[j] += wl * l
                sxl[j] += wl * v
        for j in range(G):
            D = sw[j] * sl2[j] - sl[j] * sl[j]
            a = (sw[j] * sxl[j] - sx[j] * sl[j]) / D
            b = (sl2[j] * sx[j] - sl[j] * sxl[j]) / D
            pos = b > _F0
            ts[j] = sxl[j] / sl2[j] if pos else a
            tm[j] = _F0 if pos else b
            acc[j] = D > _F0
            cur[j] = _F0
        for i in range(n):
            for j in range(G):
                v = xt[i, j]
                l = _clampf(_nint_f(isc[j] * (v - mn[j])), _F0, fnmax)
                diff = ts[j] * l + tm[j] - v
                diff = abs(diff) if use_mad else diff * diff
                cur[j] += wt[i, j] * diff
        for j in range(G):
            ok = acc[j] and cur[j] < best[j]
            best[j] = cur[j] if ok else best[j]
            scale[j] = ts[j] if ok else scale[j]
            lisc[j] = isc[j] if ok else lisc[j]  # the grid that produced the kept L
            lmn[j] = mn[j] if ok else lmn[j]
            mn[j] = tm[j] if ok else mn[j]
    for i in range(n):
        for j in range(G):
            L[i, j] = _clampf(_nint_f(lisc[j] * (xt[i, j] - lmn[j])), _F0, fnmax)
    for j in range(G):
        if mx[j] == mn0[j]:  # constant group: C returns L = 0, scale 0 before searching
            scale[j] = _F0
            mn[j] = mn0[j]
            for i in range(n):
                L[i, j] = _F0
        the_min[j] = -mn[j]


@njit(inline="always")
def _make_qp_quants(n, nmax, x, L, qw):
    """llama.cpp make_qp_quants (scalar: it runs on 8 or 16 values per super-block); L is
    uint8, so C's narrowing stores are kept."""
    mx = _F0
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = np.uint8(_nearest_int(iscale * x[i]) & 0xFF)
    scale = _F1 / iscale
    best_mse = _F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += qw[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (_P01 * np.float32(is_) + fnmax) / mx
        scale_is = _F1 / iscale_is
        mse = _F0
        for i in range(n):
            l = min(nmax, _nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = min(nmax, _nearest_int(iscale * x[i]))
        L[i] = np.uint8(l & 0xFF)
        fl = np.float32(l)
        w = qw[i]
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = np.float32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > _F0 and sl2 > _F0:
                new_l = min(nmax, _nearest_int(x[i] * sl2 / slx))
                if new_l != np.int64(L[i]):
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = np.uint8(new_l & 0xFF)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _F0 else _F0


# ---------------------------------------------------------------------------------------
# packing helpers


@njit(inline="always")
def _pack_2bit(L, out, pos):
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j = 0, 128."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[pos + j // 4 + l] = np.uint8(
                (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF
            )


@njit(inline="always")
def _pack_k4_scales(ls, lm, out, pos):
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K (ls, lm: 8 values each, <= 63)."""
    for j in range(8):
        a = ls[j]
        b = lm[j]
        if j < 4:
            out[pos + j] = np.uint8(a)
            out[pos + j + 4] = np.uint8(b)
        else:
            out[pos + j + 4] = np.uint8(((a & 0xF) | ((b & 0xF) << 4)) & 0xFF)
            out[pos + j - 4] = np.uint8((out[pos + j - 4] | ((a >> 4) << 6)) & 0xFF)
            out[pos + j] = np.uint8((out[pos + j] | ((b >> 4) << 6)) & 0xFF)


@njit(inline="always")
def _k4_scale_min(j, out, pos):
    """get_scale_min_k4 on the packed bytes."""
    if j < 4:
        return np.int64(out[pos + j] & 63), np.int64(out[pos + j + 4] & 63)
    sc = np.int64(out[pos + j + 4] & 0xF) | (np.int64(out[pos + j - 4] >> 6) << 4)
    m = np.int64(out[pos + j + 4] >> 4) | (np.int64(out[pos + j] >> 6) << 4)
    return sc, m


@njit(inline="always")
def _pack_q3_scales(Ls, out, pos):
    """Q3_K's 12 bytes of 16 six-bit scales (values 0..63)."""
    for k in range(12):
        out[pos + k] = 0
    for j in range(16):
        l = np.int64(Ls[j])
        if j < 8:
            out[pos + j] = np.uint8(l & 0xF)
        else:
            out[pos + j - 8] = np.uint8((out[pos + j - 8] | ((l & 0xF) << 4)) & 0xFF)
        l >>= 4
        out[pos + j % 4 + 8] = np.uint8((out[pos + j % 4 + 8] | (l << (2 * (j // 4)))) & 0xFF)


@njit(inline="always")
def _q3_scale(j, out, pos):
    """Signed scale j of a packed Q3_K block."""
    if j < 8:
        sc = np.int64(out[pos + j] & 0xF)
    else:
        sc = np.int64(out[pos + j - 8] >> 4)
    return (sc | (((np.int64(out[pos + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(inline="always")
def _pack_q3(L, out):
    """hmask[0:32] and qs[32:96] of a Q3_K block from L in 0..7 (L is modified)."""
    for k in range(32):
        out[k] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            out[m] = np.uint8(out[m] | hm)
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack_2bit(L, out, 32)


@njit(inline="always")
def _pack_q5k(L, out):
    """qh[16:48] and qs[48:176] of a Q5_K block from L in 0..31."""
    for k in range(32):
        out[16 + k] = 0
    m1 = 1
    m2 = 2
    q = 48
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = np.int64(L[n + j])
            if l1 > 15:
                l1 -= 16
                out[16 + j] = np.uint8(out[16 + j] | m1)
            l2 = np.int64(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                out[16 + j] = np.uint8(out[16 + j] | m2)
            out[q + j] = np.uint8(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
        q += 32


@njit(inline="always")
def _pack_q6k(L, out):
    """ql[0:128] and qh[128:192] of a Q6_K block from L in 0..63."""
    for h in range(2):
        j = 128 * h
        ql = 64 * h
        qh = 128 + 32 * h
        for l in range(32):
            a = np.int64(L[j + l])
            b = np.int64(L[j + l + 32])
            c = np.int64(L[j + l + 64])
            d = np.int64(L[j + l + 96])
            out[ql + l] = np.uint8((a & 0xF) | ((c & 0xF) << 4))
            out[ql + l + 32] = np.uint8((b & 0xF) | ((d & 0xF) << 4))
            out[qh + l] = np.uint8(((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6)) & 0xFF)


# ---------------------------------------------------------------------------------------
# Kernels: x (n_blocks, 256) float32, out (n_blocks, type_size) uint8, qw the importance
# vector of one row (blocks_per_row * 256 float32; ignored unless use_qw). Work is split into
# chunks of _CB super-blocks; each chunk runs its searches as lanes (one lane per sub-block),
# then finishes each super-block (sub-block scales, re-quantization, packing) one by one.

_CB = 8


@njit(inline="always")
def _sum_sq(x, n):
    s = _F0
    for i in range(n):
        s += x[i] * x[i]
    return s


@njit(inline="always")
def _fill_lanes(xb, qb, use_qw, sigma2, n, per_sb, lane0, xt, wt, sw, mode):
    """Put the per_sb groups of n elements of super-block xb into lanes lane0.. of xt and their
    weights into wt: use_qw -> qw*sqrt(sigma2 + x^2) (and sw = their sums); otherwise
    mode 0: |x|, mode 1: sqrt(sum(x^2)/n) + |x| (per group), mode 2: none."""
    for j in range(per_sb):
        lane = lane0 + j
        if use_qw:
            for i in range(n):
                v = xb[n * j + i]
                xt[i, lane] = v
                wt[i, lane] = qb[n * j + i] * np.sqrt(sigma2 + v * v)
            s = _F0
            for i in range(n):
                s += wt[i, lane]
            sw[lane] = s
        elif mode == 0:
            for i in range(n):
                v = xb[n * j + i]
                xt[i, lane] = v
                wt[i, lane] = abs(v)
        elif mode == 1:
            av = np.sqrt(_sum_sq(xb[n * j : n * j + n], n) / np.float32(n))
            for i in range(n):
                v = xb[n * j + i]
                xt[i, lane] = v
                wt[i, lane] = av + abs(v)
        else:
            for i in range(n):
                xt[i, lane] = xb[n * j + i]


@njit(inline="always")
def _row_weights(qw, use_qw, per_row, b):
    if use_qw:
        k = b % per_row
        return qw[k * QK_K : (k + 1) * QK_K]
    return qw


@njit(inline="always")
def _take_lanes(L, n, per_sb, lane0, Lq):
    """Lq[n*j + i] = L[i, lane0 + j] as integers (the search's quants of one super-block)."""
    for j in range(per_sb):
        for i in range(n):
            Lq[n * j + i] = np.int64(L[i, lane0 + j])


@njit(parallel=True, cache=True)
def _kernel_q2_k(x, qw, use_qw, out):
    n_blocks = x.shape[0]
    per_row = max(1, qw.shape[0] // QK_K)
    n_chunks = (n_blocks + _CB - 1) // _CB
    for c in prange(n_chunks):
        lanes = _CB * 16
        xt = np.empty((16, lanes), np.float32)
        wt = np.empty((16, lanes), np.float32)
        L = np.empty((16, lanes), np.float32)
        S = _lane_state(lanes)
        scales = np.empty(lanes, np.float32)
        mins = np.empty(lanes, np.float32)
        sw = np.empty(lanes, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        Lq = np.empty(QK_K, np.int64)
        b0 = c * _CB
        nb = min(_CB, n_blocks - b0)
        for b in range(nb):
            xb = x[b0 + b]
            sigma2 = _sum_sq(xb, QK_K) / _F256 if use_qw else _F0
            _fill_lanes(xb, _row_weights(qw, use_qw, per_row, b0 + b), use_qw, sigma2, 16, 16, 16 * b, xt, wt, sw, 0)
        if use_qw:
            _lanes_qkx(16, nb * 16, 3, xt, wt, L, S, _RMIN_IMAT, _RDELTA_IMAT, 36, False, scales, mins)
        else:
            _lanes_qkx(16, nb * 16, 3, xt, wt, L, S, _RMIN_Q2, _RDELTA, 15, True, scales, mins)
        for b in range(nb):
            xb = x[b0 + b]
            ob = out[b0 + b]
            _take_lanes(L, 16, 16, 16 * b, Lq)
            sc = scales[16 * b : 16 * b + 16]
            mi = mins[16 * b : 16 * b + 16]
            if use_qw:
                dm = _make_qp_quants(16, 15, sc, Ls, sw[16 * b : 16 * b + 16])
                mm = _make_qp_quants(16, 15, mi, Lm, sw[16 * b : 16 * b + 16])
                dq = _store_f16(ob, 80, dm)
                mq = _store_f16(ob, 82, mm)
                for j in range(16):
                    ob[j] = np.uint8((np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF)
            else:
                max_scale = _F0
                max_min = _F0
                for j in range(16):
                    if sc[j] > max_scale:
                        max_scale = sc[j]
                    if mi[j] > max_min:
                        max_min = mi[j]
                if max_scale > _F0:
                    iscale = _F15 / max_scale
                    for j in range(16):
                        ob[j] = np.uint8(_nearest_int(iscale * sc[j]) & 0xFF)
                    dq = _store_f16(ob, 80, max_scale / _F15)
                else:
                    for j in range(16):
                        ob[j] = 0
                    dq = _store_f16(ob, 80, _F0)
                if max_min > _F0:
                    iscale = _F15 / max_min
                    for j in range(16):
                        ob[j] = np.uint8((np.int64(ob[j]) | (_nearest_int(iscale * mi[j]) << 4)) & 0xFF)
                    mq = _store_f16(ob, 82, max_min / _F15)
                else:
                    mq = _store_f16(ob, 82, _F0)
            for j in range(16):
                d = dq * np.float32(ob[j] & 0xF)
                if d == _F0:
                    continue
                dm = mq * np.float32(ob[j] >> 4)
                for ii in range(16):
                    Lq[16 * j + ii] = np.int64(_clampf(_nint_f((xb[16 * j + ii] + dm) / d), _F0, np.float32(3)))
            _pack_2bit(Lq, ob, 16)


@njit(parallel=True, cache=True)
def _kernel_q3_k(x, qw, use_qw, out):
    n_blocks = x.shape[0]
    per_row = max(1, qw.shape[0] // QK_K)
    n_chunks = (n_blocks + _CB - 1) // _CB
    for c in prange(n_chunks):
        lanes = _CB * 16
        xt = np.empty((16, lanes), np.float32)
        wt = np.empty((16, lanes), np.float32)
        L = np.empty((16, lanes), np.float32)
        S = _lane_state(lanes)
        scales = np.empty(lanes, np.float32)
        sw = np.empty(lanes, np.float32)
        # second level (imatrix path): one lane per super-block, its 16 scales as elements
        st = np.empty((16, _CB), np.float32)
        swt = np.empty((16, _CB), np.float32)
        Lst = np.empty((16, _CB), np.float32)
        dblk = np.empty(_CB, np.float32)
        Ls = np.empty(16, np.int64)
        Lq = np.empty(QK_K, np.int64)
        b0 = c * _CB
        nb = min(_CB, n_blocks - b0)
        for b in range(nb):
            xb = x[b0 + b]
            sigma2 = _F2 * _sum_sq(xb, QK_K) / _F256 if use_qw else _F0
            _fill_lanes(xb, _row_weights(qw, use_qw, per_row, b0 + b), use_qw, sigma2, 16, 16, 16 * b, xt, wt, sw, 2)
        if use_qw:
            _lanes_qx(16, nb * 16, 4, xt, wt, True, L, S, scales)
            for b in range(nb):
                for j in range(16):
                    st[j, b] = scales[16 * b + j]
                    swt[j, b] = sw[16 * b + j]
            _lanes_qx(16, nb, 32, st, swt, True, Lst, S, dblk)
        else:
            _lanes_q3(16, nb * 16, 4, xt, L, S, scales)
        for b in range(nb):
            xb = x[b0 + b]
            ob = out[b0 + b]
            _take_lanes(L, 16, 16, 16 * b, Lq)
            if use_qw:
                for j in range(16):
                    Ls[j] = np.int64(Lst[j, b])
                _pack_q3_scales(Ls, ob, 96)
                dq = _store_f16(ob, 108, dblk[b])
            else:
                max_scale = _F0
                amax = _F0
                for j in range(16):
                    a = abs(scales[16 * b + j])
                    if a > amax:
                        amax = a
                        max_scale = scales[16 * b + j]
                if max_scale != _F0:
                    iscale = -_F32 / max_scale
                    for j in range(16):
                        l = _nearest_int(iscale * scales[16 * b + j]) & 0xFF  # int8_t store
                        if l >= 128:
                            l -= 256
                        Ls[j] = max(-32, min(31, l)) + 32
                    _pack_q3_scales(Ls, ob, 96)
                    dq = _store_f16(ob, 108, _F1 / iscale)
                else:
                    for k in range(12):
                        ob[96 + k] = 0
                    dq = _store_f16(ob, 108, _F0)
            for j in range(16):
                d = dq * np.float32(_q3_scale(j, ob, 96))
                if d == _F0:
                    continue
                for ii in range(16):
                    Lq[16 * j + ii] = np.int64(_clampf(_nint_f(xb[16 * j + ii] / d), np.float32(-4), np.float32(3))) + 4
            _pack_q3(Lq, ob)


@njit(parallel=True, cache=True)
def _kernel_q45_k(x, qw, use_qw, nmax, out):
    """Q4_K (nmax 15) and Q5_K (nmax 31)."""
    n_blocks = x.shape[0]
    per_row = max(1, qw.shape[0] // QK_K)
    n_chunks = (n_blocks + _CB - 1) // _CB
    if use_qw:
        rmin, rdelta, nstep = _RMIN_IMAT, _RDELTA_IMAT, 36
    elif nmax == 15:
        rmin, rdelta, nstep = _RMIN_Q4, _RDELTA, 20
    else:
        rmin, rdelta, nstep = _RMIN_Q5, _RDELTA, 15
    fnmax = np.float32(nmax)
    for c in prange(n_chunks):
        lanes = _CB * 8
        xt = np.empty((32, lanes), np.float32)
        wt = np.empty((32, lanes), np.float32)
        L = np.empty((32, lanes), np.float32)
        S = _lane_state(lanes)
        scales = np.empty(lanes, np.float32)
        mins = np.empty(lanes, np.float32)
        sw = np.empty(lanes, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        Lq = np.empty(QK_K, np.int64)
        b0 = c * _CB
        nb = min(_CB, n_blocks - b0)
        for b in range(nb):
            xb = x[b0 + b]
            sigma2 = _F2 * _sum_sq(xb, QK_K) / _F256 if use_qw else _F0
            _fill_lanes(xb, _row_weights(qw, use_qw, per_row, b0 + b), use_qw, sigma2, 32, 8, 8 * b, xt, wt, sw, 1)
        _lanes_qkx(32, nb * 8, nmax, xt, wt, L, S, rmin, rdelta, nstep, False, scales, mins)
        for b in range(nb):
            xb = x[b0 + b]
            ob = out[b0 + b]
            _take_lanes(L, 32, 8, 8 * b, Lq)
            sc = scales[8 * b : 8 * b + 8]
            mi = mins[8 * b : 8 * b + 8]
            if use_qw:
                d_block = _make_qp_quants(8, 63, sc, Ls, sw[8 * b : 8 * b + 8])
                m_block = _make_qp_quants(8, 63, mi, Lm, sw[8 * b : 8 * b + 8])
                if nmax == 31:  # quantize_row_q5_K_impl clamps to 63, the Q4_K one does not
                    for j in range(8):
                        Ls[j] = min(np.uint8(63), Ls[j])
                        Lm[j] = min(np.uint8(63), Lm[j])
            else:
                max_scale = _F0
                max_min = _F0
                for j in range(8):
                    if sc[j] > max_scale:
                        max_scale = sc[j]
                    if mi[j] > max_min:
                        max_min = mi[j]
                inv_scale = _F63 / max_scale if max_scale > _F0 else _F0
                inv_min = _F63 / max_min if max_min > _F0 else _F0
                for j in range(8):
                    Ls[j] = min(np.uint8(63), np.uint8(_nearest_int(inv_scale * sc[j]) & 0xFF))
                    Lm[j] = min(np.uint8(63), np.uint8(_nearest_int(inv_min * mi[j]) & 0xFF))
                d_block = max_scale / _F63
                m_block = max_min / _F63
            _pack_k4_scales(Ls, Lm, ob, 4)
            dq = _store_f16(ob, 0, d_block)
            mq = _store_f16(ob, 2, m_block)
            for j in range(8):
                s_, m_ = _k4_scale_min(j, ob, 4)
                d = dq * np.float32(s_)
                if d == _F0:
                    continue
                dm = mq * np.float32(m_)
                for ii in range(32):
                    Lq[32 * j + ii] = np.int64(_clampf(_nint_f((xb[32 * j + ii] + dm) / d), _F0, fnmax))
            if nmax == 15:
                for h in range(4):
                    for l in range(32):
                        ob[16 + 32 * h + l] = np.uint8(Lq[64 * h + l] | (Lq[64 * h + l + 32] << 4))
            else:
                _pack_q5k(Lq, ob)


@njit(parallel=True, cache=True)
def _kernel_q6_k(x, qw, use_qw, out):
    n_blocks = x.shape[0]
    per_row = max(1, qw.shape[0] // QK_K)
    n_chunks = (n_blocks + _CB - 1) // _CB
    for c in prange(n_chunks):
        lanes = _CB * 16
        xt = np.empty((16, lanes), np.float32)
        wt = np.empty((16, lanes), np.float32)
        L = np.empty((16, lanes), np.float32)
        S = _lane_state(lanes)
        scales = np.empty(lanes, np.float32)
        Lq = np.empty(QK_K, np.int64)
        b0 = c * _CB
        nb = min(_CB, n_blocks - b0)
        for b in range(nb):
            xb = x[b0 + b]
            qb = _row_weights(qw, use_qw, per_row, b0 + b)
            for j in range(16):
                for i in range(16):
                    xt[i, 16 * b + j] = xb[16 * j + i]
                    if use_qw:  # Q6_K uses the importance itself as the weight
                        wt[i, 16 * b + j] = qb[16 * j + i]
        _lanes_qx(16, nb * 16, 32, xt, wt, use_qw, L, S, scales)
        for b in range(nb):
            xb = x[b0 + b]
            ob = out[b0 + b]
            _take_lanes(L, 16, 16, 16 * b, Lq)
            max_scale = _F0
            max_abs = _F0
            for j in range(16):
                s = scales[16 * b + j]
                a = abs(s)
                if a > max_abs:
                    max_abs = a
                    max_scale = s
            if max_abs < _EPS:
                for k in range(210):
                    ob[k] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            dq = _store_f16(ob, 208, _F1 / iscale)
            for j in range(16):
                ob[192 + j] = np.uint8(min(127, _nearest_int(iscale * scales[16 * b + j])) & 0xFF)
            for j in range(16):
                q = np.int64(ob[192 + j])
                d = dq * np.float32(q - 256 if q >= 128 else q)
                if d == _F0:
                    continue
                for ii in range(16):
                    Lq[16 * j + ii] = np.int64(_clampf(_nint_f(xb[16 * j + ii] / d), np.float32(-32), np.float32(31))) + 32
            _pack_q6k(Lq, ob)


@njit(parallel=True, cache=True)
def _kernel_q8_k(x, out):
    for b in prange(x.shape[0]):
        xb = x[b]
        ob = out[b]
        mx = _F0
        amax = _F0
        for j in range(QK_K):
            ax = abs(xb[j])
            if ax > amax:
                amax = ax
                mx = xb[j]
        for k in range(292):
            ob[k] = 0
        if amax == _F0:
            continue
        iscale = np.float32(-127.0) / mx
        for j in range(QK_K):
            ob[4 + j] = np.uint8(min(127, _nearest_int(iscale * xb[j])) & 0xFF)
        for j in range(16):
            s = 0
            for ii in range(16):
                q = np.int64(ob[4 + 16 * j + ii])
                s += q - 256 if q >= 128 else q
            s &= 0xFFFF
            ob[260 + 2 * j] = np.uint8(s & 0xFF)
            ob[261 + 2 * j] = np.uint8(s >> 8)
        bits = np.int64(_f32_bits(_F1 / iscale)) & 0xFFFFFFFF
        for k in range(4):
            ob[k] = np.uint8((bits >> (8 * k)) & 0xFF)


@njit(parallel=True, cache=True)
def _kernel_legacy_imatrix(kind, rows, qw, out):
    """llama.cpp quantize_row_q4_0_impl etc. with quant_weights, one row per task.

    kind: 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1; out (n_rows, n_blocks * type_size). The blocks of
    32 of a row are the lanes."""
    n_rows, n_per_row = rows.shape
    nb = n_per_row // 32
    ts = 18 if kind == 2 else 20 if kind == 3 else 22 if kind == 6 else 24
    nmax = 8 if kind == 2 else 15 if kind == 3 else 16 if kind == 6 else 31
    for r in prange(n_rows):
        x = rows[r]
        o = out[r]
        xt = np.empty((32, nb), np.float32)
        wt = np.empty((32, nb), np.float32)
        L = np.empty((32, nb), np.float32)
        S = _lane_state(nb)
        sc = np.empty(nb, np.float32)
        mn = np.empty(nb, np.float32)
        sigma2 = _sum_sq(x, n_per_row) / np.float32(n_per_row)
        for ib in range(nb):
            for j in range(32):
                v = x[32 * ib + j]
                xt[j, ib] = v
                wt[j, ib] = qw[32 * ib + j] * np.sqrt(sigma2 + v * v)
        if kind == 2 or kind == 6:
            _lanes_qx(32, nb, nmax, xt, wt, True, L, S, sc)
        else:
            _lanes_qkx(32, nb, nmax, xt, wt, L, S, _RMIN_IMAT, _RDELTA_IMAT, 36, False, sc, mn)
        for ib in range(nb):
            p = ib * ts
            _store_f16(o, p, sc[ib])
            q = p + 2
            if kind == 3 or kind == 7:
                _store_f16(o, p + 2, -mn[ib])
                q = p + 4
            if kind == 6 or kind == 7:
                qh = 0
                for j in range(32):
                    qh |= ((np.int64(L[j, ib]) >> 4) & 1) << j
                for k in range(4):
                    o[q + k] = np.uint8((qh >> (8 * k)) & 0xFF)
                q += 4
            for j in range(16):
                o[q + j] = np.uint8((np.int64(L[j, ib]) & 0xF) | ((np.int64(L[j + 16, ib]) & 0xF) << 4))


# ---------------------------------------------------------------------------------------
# Python entry points

_TYPE_SIZE = {10: 84, 11: 110, 12: 144, 13: 176, 14: 210, 15: 292}
_NO_WEIGHTS = np.zeros(QK_K, np.float32)


def _check_importance(importance: np.ndarray | None, n: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if imp.size != n:
        raise QConvertError(f"importance vector has {imp.size} values, the rows have {n}")
    if not np.all(np.isfinite(imp)):
        raise QConvertError("importance vector holds non-finite values")
    return imp


def quantize_k(type_id: int, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(n_rows, n) float32 -> (n_rows, n/256 * type_size) uint8 for K-quant ``type_id``
    (10 Q2_K ... 14 Q6_K, 15 Q8_K); ``importance``: one weight per column, or None."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    n_rows, n = rows.shape
    if n % QK_K:
        raise QConvertError(f"K-quants need rows that are a multiple of {QK_K} elements, got {n}")
    imp = _check_importance(importance, n) if type_id != 15 else None
    x = np.ascontiguousarray(rows).reshape(-1, QK_K)
    out = np.empty((x.shape[0], _TYPE_SIZE[type_id]), np.uint8)
    if x.shape[0]:
        qw, use = (_NO_WEIGHTS, False) if imp is None else (imp, True)
        if type_id == 10:
            _kernel_q2_k(x, qw, use, out)
        elif type_id == 11:
            _kernel_q3_k(x, qw, use, out)
        elif type_id in (12, 13):
            _kernel_q45_k(x, qw, use, 15 if type_id == 12 else 31, out)
        elif type_id == 14:
            _kernel_q6_k(x, qw, use, out)
        else:
            _kernel_q8_k(x, out)
    return out.reshape(n_rows, n // QK_K * _TYPE_SIZE[type_id])


def quantize_legacy_imatrix(type_id: int, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """llama.cpp's imatrix quantizers for Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7) on whole rows."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    n_rows, n = rows.shape
    if n % 32:
        raise QConvertError(f"rows must be a multiple of 32 elements, got {n}")
    imp = _check_importance(importance, n)
    ts = {2: 18, 3: 20, 6: 22, 7: 24}[type_id]
    out = np.empty((n_rows, n // 32 * ts), np.uint8)
    if n_rows and n:
        _kernel_legacy_imatrix(type_id, rows, imp, out)
    return out


# ---------------------------------------------------------------------------------------
# dequantization (vectorised numpy; the same float32 operations as ggml and gguf-py)


def _f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(_F16).astype(np.float32)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """(n, 64) -> (n, 256) 2-bit values: element 128h + 32s + l is bits 2s of byte 32h + l."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)).reshape(n, QK_K)


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed bytes -> (n, 8) scales, (n, 8) mins (get_scale_min_k4)."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales, mins


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """(n, 12) -> (n, 16) signed scales (-32..31)."""
    low = np.concatenate([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], axis=1)
    j = np.arange(16)
    high = (sc[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int16) - 32


def _dequant_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc = blocks[:, 0:16]
    d = _f16_at(blocks, 80)
    dmin = _f16_at(blocks, 82)
    dl = (d * (sc & 0xF).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
    q = _unpack_2bit(blocks[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequant_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = _f16_at(blocks, 108)
    dl = (d * _q3_scales(blocks[:, 96:108]).astype(np.float32)).reshape(n, 16, 1)
    low = _unpack_2bit(blocks[:, 32:96])
    # high bit of element j: hmask[j % 32] bit j // 32; q = low - (hbit ? 0 : 4)
    hbits = np.unpackbits(blocks[:, 0:32].reshape(n, 32, 1), axis=2, bitorder="little")  # (n, 32, 8)
    hbits = hbits.transpose(0, 2, 1).reshape(n, QK_K)
    q = low.astype(np.int8) - ((hbits ^ 1) << 2).astype(np.int8)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _dequant_q45_k(blocks: np.ndarray, five: bool) -> np.ndarray:
    n = blocks.shape[0]
    d = _f16_at(blocks, 0)
    dmin = _f16_at(blocks, 2)
    sc, m = _k4_scales(blocks[:, 4:16])
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * m.astype(np.float32)).reshape(n, 8, 1)
    qs = blocks[:, 48:176] if five else blocks[:, 16:144]
    q = np.stack([qs.reshape(n, 4, 32) & 0xF, qs.reshape(n, 4, 32) >> 4], axis=2).reshape(n, 8, 32)
    if five:
        # element 64c + l: qh[l] bit 2c; element 64c + 32 + l: qh[l] bit 2c + 1
        bits = np.unpackbits(blocks[:, 16:48].reshape(n, 32, 1), axis=2, bitorder="little")  # (n, 32, 8)
        q = q | (bits.transpose(0, 2, 1) << 4)
    return (dl * q.astype(np.float32) - ml).reshape(n, QK_K)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # half, (ql[l] | ql[l+32]), l
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = np.stack([ql & 0xF, ql >> 4], axis=2).reshape(n, 2, 4, 32)  # e_l, e_l+32, e_l+64, e_l+96
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_at(blocks, 208)
    dl = (d * sc).reshape(n, 16, 1)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


def _dequant_q8_k(blocks: np.ndarray) -> np.ndarray:
    d = np.ascontiguousarray(blocks[:, 0:4]).view("<f4").astype(np.float32)
    q = blocks[:, 4:260].view(np.int8).astype(np.float32)
    return d * q


def _chunked(fn):
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        for s in range(0, blocks.shape[0], 4096):
            out[s : s + 4096] = fn(blocks[s : s + 4096])
        return out

    return dequantize_blocks


def _quantizers(type_id: int):
    def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
        return quantize_k(type_id, np.asarray(blocks, np.float32).reshape(-1, QK_K))

    def quantize_rows(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return quantize_k(type_id, rows, importance)

    return quantize_blocks, quantize_rows


def _register(type_id, name, type_size, dequant, description, rows=True):
    qb, qr = _quantizers(type_id)
    return register(
        BlockType(
            id=type_id,
            name=name,
            block_size=QK_K,
            type_size=type_size,
            quantize_blocks=qb,
            dequantize_blocks=_chunked(dequant),
            description=description,
            quantize_rows=qr if rows else None,
        )
    )


Q2_K = _register(
    10, "Q2_K", 84, _dequant_q2_k,
    "x = d*(sc&15)*q - dmin*(sc>>4); scales u8[16] (4-bit scale | 4-bit min), qs u8[64] (2-bit q), d, dmin: f16",
)
Q3_K = _register(
    11, "Q3_K", 110, _dequant_q3_k,
    "x = d*(sc-32)*(q-4); hmask u8[32] (bit 2 of q), qs u8[64] (low 2 bits), scales u8[12] (16 x 6-bit), d: f16",
)
Q4_K = _register(
    12, "Q4_K", 144, lambda b: _dequant_q45_k(b, False),
    "x = d*sc*q - dmin*m; d, dmin: f16, scales u8[12] (8 x 6-bit scale and min), qs u8[128] (4-bit q)",
)
Q5_K = _register(
    13, "Q5_K", 176, lambda b: _dequant_q45_k(b, True),
    "x = d*sc*q - dmin*m; d, dmin: f16, scales u8[12], qh u8[32] (bit 4 of q), qs u8[128] (low 4 bits)",
)
Q6_K = _register(
    14, "Q6_K", 210, _dequant_q6_k,
    "x = d*sc*(q-32); ql u8[128] (low 4 bits), qh u8[64] (high 2 bits), scales i8[16], d: f16",
)
Q8_K = _register(
    15, "Q8_K", 292, _dequant_q8_k,
    "x = d*q; d: f32, qs i8[256], bsums i16[16] (sums of 16 q); llama.cpp's activation format",
    rows=False,
)
