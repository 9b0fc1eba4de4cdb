"""Kernels for GGML's K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Layouts (ANCHORS.md §B2; d and dmin IEEE halves; every element is w = dl * q - ml with
dl = d * sc and ml = dmin * m per sub-block):
  Q2_K  scales[16] | qs[64] | d | dmin    16 x 16: sc = low nibble, m = high nibble, q 2-bit
  Q3_K  hmask[32] | qs[64] | scales[12] | d   16 x 16: sc 6-bit - 32, q = low2 - 4 * !hbit
  Q4_K  d | dmin | scales[12] | qs[128]       8 x 32: 6-bit sc and m (get_scale_min_k4), q 4-bit
  Q5_K  d | dmin | scales[12] | qh[32] | qs[128]   as Q4_K, q 5-bit
  Q6_K  ql[128] | qh[64] | scales[16]:i8 | d  16 x 16: q = (low4 | high2 << 4) - 32
Bit packings: 2-bit: per 128-half h, byte qs[32h + l] holds elements l, l+32, l+64, l+96 at
bits 0, 2, 4, 6; 4-bit: per 64-chunk c, byte qs[32c + l] holds element l (low nibble) and
l + 32 (high); hmask/qh (Q3_K/Q5_K): element e has bit e // 32 of byte e % 32; Q6_K: see
``_pieces``.

Arithmetic: exact float math on the weights, no activation quantisation (as legacy.py). A
super-block is decoded as 16 vectors of 16 quants (integers, centred in integers, then
converted to float, all exact) and 16 or 8 sub-block scales dl = d * sc (one vector, exact
in float32). Per sub-block the kernel forms t = sum q * x over its elements in a 16-lane
vector and accumulates acc += dl * t (4 rotating accumulators); the mins contribute
macc += ml * xsum (xsum: the sums of x over each sub-block, computed once per call), and the
row's result is hsum(acc) - hsum(macc). The scales are decoded with vector shuffles and
per-lane shifts, inside the kernel; no weight matrix is ever dequantised as a whole.

``dequant_rows`` writes dl * q - ml with plain float32 operations (no fast-math flags, no
contraction), bit-identical to gguf-py's ``dequantize`` (``d * sc`` and ``dl * q`` are exact,
the subtraction rounds once in both). Batched products (T >= SMALL_T) dequantise GEMM_ROWS
rows at a time into a float32 tile and multiply it by all tokens with the register-tiled
micro-kernel of ``_ir`` (the mechanism of legacy.py).

One numba function per operation serves all five types: the block type is a run-time
``kind`` that selects one of five specialised loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _ir
from ._ir import F32, I8, I16, I32, FAST, const, gep, i64, load, splat, store, vec
from ._ir import GEMM_ROWS, gemm_rows
from ._family import register_family_kernel

QK_K = 256
# kind id -> (name, type_size, elements per sub-block, has mins)
_LAYOUT = {
    0: ("Q2_K", 84, 16, True),
    1: ("Q3_K", 110, 16, False),
    2: ("Q4_K", 144, 32, True),
    3: ("Q5_K", 176, 32, True),
    4: ("Q6_K", 210, 16, False),
}
KINDS = {name: kind for kind, (name, *_rest) in _LAYOUT.items()}
TYPE_SIZE = {name: size for name, size, *_rest in _LAYOUT.values()}

V16F = vec(F32, 16)
V16I = vec(I32, 16)
V32I = vec(I32, 32)


def _c(n: int, values):
    """A constant <n x i32> (a scalar is splatted)."""
    return const(vec(I32, n), values)


def _bytes(b, p, off: int, n: int):
    """n bytes at p + off, zero-extended to <n x i32>."""
    return b.zext(load(b, p, off, vec(I8, n)), vec(I32, n))


def _shuffle(b, v, idx, w=None):
    return b.shuffle_vector(v, v if w is None else w, _c(len(idx), list(idx)))


def _halves(b, v32):
    """<32 x i32> -> its lanes 0..15 and 16..31."""
    return _ir.lanes(b, v32, 0, 16), _ir.lanes(b, v32, 16, 16)


def _scales(b, kind: int, p):
    """Sub-block scales dl = d * sc (float vector of 16 or 8 lanes) and mins ml = dmin * m
    (same shape) or None. Products of a half and a <= 8-bit integer: exact in float32."""
    if kind == 0:  # Q2_K: scales[16] at 0, d at 80, dmin at 82
        s = _bytes(b, p, 0, 16)
        d = _ir.f16_to_f32(b, load(b, p, 80, I16))
        dmin = _ir.f16_to_f32(b, load(b, p, 82, I16))
        sc = b.and_(s, _c(16, 15))
        m = b.lshr(s, _c(16, 4))
        return (
            b.fmul(splat(b, d, 16), b.sitofp(sc, V16F)),
            b.fmul(splat(b, dmin, 16), b.sitofp(m, V16F)),
        )
    if kind == 1:  # Q3_K: scales[12] at 96, d at 108
        lo8 = _bytes(b, p, 96, 8)
        hi4 = _bytes(b, p, 104, 4)
        d = _ir.f16_to_f32(b, load(b, p, 108, I16))
        # scale j: low 4 bits = scales[j] & 15 (j < 8) or scales[j - 8] >> 4;
        # high 2 bits = scales[8 + j % 4] >> 2 * (j // 4)
        low = b.and_(b.lshr(_shuffle(b, lo8, list(range(8)) * 2), _c(16, [0] * 8 + [4] * 8)), _c(16, 15))
        high = b.and_(
            b.lshr(_shuffle(b, hi4, [0, 1, 2, 3] * 4), _c(16, [2 * (j // 4) for j in range(16)])), _c(16, 3)
        )
        sc = b.sub(b.or_(low, b.shl(high, _c(16, 4))), _c(16, 32))
        return b.fmul(splat(b, d, 16), b.sitofp(sc, V16F)), None
    if kind in (2, 3):  # Q4_K / Q5_K: d at 0, dmin at 2, scales[12] at 4
        b07 = _bytes(b, p, 4, 8)
        b811 = _shuffle(b, _bytes(b, p, 12, 4), [0, 1, 2, 3, 0, 1, 2, 3])  # widen to 8 lanes
        d = _ir.f16_to_f32(b, load(b, p, 0, I16))
        dmin = _ir.f16_to_f32(b, load(b, p, 2, I16))
        # get_scale_min_k4: j < 4: sc = b[j] & 63, m = b[j+4] & 63;
        #                   j >= 4: sc = (b[j+4] & 15) | (b[j-4] >> 6) << 4,
        #                           m = (b[j+4] >> 4) | (b[j] >> 6) << 4
        top = _c(8, [0] * 4 + [0x30] * 4)
        a = _shuffle(b, b07, [0, 1, 2, 3, 8, 9, 10, 11], b811)  # b[j] | b[j+4] (j >= 4)
        bb = _shuffle(b, b07, [0, 1, 2, 3, 0, 1, 2, 3])  # b[j-4] for j >= 4
        sc = b.or_(b.and_(a, _c(8, [63] * 4 + [15] * 4)), b.and_(b.lshr(bb, _c(8, 2)), top))
        cc = _shuffle(b, b07, [4, 5, 6, 7, 8, 9, 10, 11], b811)  # b[j+4]
        dd = _shuffle(b, b07, [4, 5, 6, 7, 4, 5, 6, 7])  # b[j] for j >= 4
        m = b.or_(
            b.and_(b.lshr(cc, _c(8, [0] * 4 + [4] * 4)), _c(8, [63] * 4 + [15] * 4)),
            b.and_(b.lshr(dd, _c(8, 2)), top),
        )
        V8F = vec(F32, 8)
        return b.fmul(splat(b, d, 8), b.sitofp(sc, V8F)), b.fmul(splat(b, dmin, 8), b.sitofp(m, V8F))
    # Q6_K: scales[16] int8 at 192, d at 208
    s = b.sext(load(b, p, 192, vec(I8, 16)), V16I)
    d = _ir.f16_to_f32(b, load(b, p, 208, I16))
    return b.fmul(splat(b, d, 16), b.sitofp(s, V16F)), None


#: kind -> integer lane type of the quant bit manipulation (measured per type, single thread,
#: AVX-512, 576x1536: bytes make Q3_K/Q5_K/Q6_K 9-13 % faster than 32-bit lanes, 32-bit lanes
#: Q2_K/Q4_K 4-5 % faster than bytes; 16-bit lanes were slowest for all five)
_QTYPE = {0: I32, 1: I8, 2: I32, 3: I8, 4: I8}


class _Q:
    """Integer vector ops on 32 quants at a time in lane type ``qt``."""

    def __init__(self, b, p, qt):
        self.b, self.p, self.qt, self.vt = b, p, qt, vec(qt, 32)

    def bytes(self, off: int):
        v = load(self.b, self.p, off, vec(I8, 32))
        return v if self.qt is I8 else self.b.zext(v, self.vt)

    def k(self, v):
        return const(self.vt, v)

    def to_float(self, q):
        """quants (values in -32..63) -> two <16 x float>, exact."""
        b = self.b
        if self.qt is not I32:
            q = b.sext(q, V32I)
        lo, hi = _halves(b, q)
        return b.sitofp(lo, V16F), b.sitofp(hi, V16F)


def _pieces(b, kind: int, p):
    """Yield (i, q) for i = 0..15: q = the quants of elements 16i..16i+15 as a float vector
    (centred for Q3_K/Q6_K). A generator, so that each piece's IR is emitted just before
    the caller's use of it. The bit manipulation runs on 32 bytes at a time."""
    Q = _Q(b, p, _QTYPE[kind])
    _k = Q.k
    if kind in (0, 1):  # 2-bit planes: Q2_K qs at 16, Q3_K qs at 32 (+ hmask at 0)
        qs_off = 16 if kind == 0 else 32
        hm = Q.bytes(0) if kind == 1 else None
        for h in range(2):
            q8 = Q.bytes(qs_off + 32 * h)
            for k in range(4):
                q = b.and_(b.lshr(q8, _k(2 * k)), _k(3))
                if hm is not None:  # q - 4 where the high bit is clear
                    hb = b.and_(b.lshr(hm, _k(4 * h + k)), _k(1))
                    q = b.sub(q, b.shl(b.xor(hb, _k(1)), _k(2)))
                lo, hi = Q.to_float(q)
                yield 8 * h + 2 * k, lo
                yield 8 * h + 2 * k + 1, hi
    elif kind in (2, 3):  # 4-bit: Q4_K qs at 16; Q5_K qh at 16, qs at 48
        qs_off = 16 if kind == 2 else 48
        qh = Q.bytes(16) if kind == 3 else None
        for c in range(4):
            q8 = Q.bytes(qs_off + 32 * c)
            for k, q in enumerate((b.and_(q8, _k(15)), b.lshr(q8, _k(4)))):
                if qh is not None:
                    bit = b.and_(b.lshr(qh, _k(2 * c + k)), _k(1))
                    q = b.or_(q, b.shl(bit, _k(4)))
                lo, hi = Q.to_float(q)
                yield 4 * c + 2 * k, lo
                yield 4 * c + 2 * k + 1, hi
    else:  # Q6_K: per 128-half h, l < 32: ql[64h+l] = e_l | e_{l+64} << 4,
        # ql[64h+32+l] = e_{l+32} | e_{l+96} << 4, qh[32h+l] = hi2 of e_l, e_{l+32}, e_{l+64}, e_{l+96}
        for h in range(2):
            qla = Q.bytes(64 * h)
            qlb = Q.bytes(64 * h + 32)
            qh = Q.bytes(128 + 32 * h)
            for k in range(4):
                ql = qla if k % 2 == 0 else qlb
                low = b.and_(ql, _k(15)) if k < 2 else b.lshr(ql, _k(4))
                high = b.and_(b.lshr(qh, _k(2 * k)), _k(3))
                q = b.sub(b.or_(low, b.shl(high, _k(4))), _k(32))
                lo, hi = Q.to_float(q)
                yield 8 * h + 2 * k, lo
                yield 8 * h + 2 * k + 1, hi


def _lane(b, v, i: int):
    return b.extract_element(v, const(I32, i))


_NACC = 4  # rotating accumulators per row


def _emit_rowdot(builder, kind, row, xp, xsp, nb):
    """sum over super-blocks of the row at ``row`` times x; returns a float.
    xsp: sums of x per sub-block (the types with mins)."""
    _name, size, sub, has_min = _LAYOUT[kind]
    n_sub = QK_K // sub
    zero_v = const(V16F, 0.0)
    MV = vec(F32, n_sub)
    inits = [zero_v] * _NACC + ([const(MV, 0.0)] if has_min else [])

    def body(b, bi, vals):
        accs = list(vals[:_NACC])
        p = gep(b, row, b.mul(bi, i64(size)))
        dl, ml = _scales(b, kind, p)
        xo = b.mul(bi, i64(QK_K * 4))
        t = None
        for i, q in _pieces(b, kind, p):
            xv = load(b, xp, b.add(xo, i64(64 * i)), V16F, align=4)
            prod = b.fmul(q, xv, flags=FAST)
            t = prod if (t is None or sub == 16) else b.fadd(t, prod, flags=FAST)
            if (i + 1) % (sub // 16) == 0:  # sub-block complete
                s = i // (sub // 16)
                k = s % _NACC
                accs[k] = b.fadd(b.fmul(splat(b, _lane(b, dl, s), 16), t, flags=FAST), accs[k], flags=FAST)
                t = None
        out = accs
        if has_min:
            xs = load(b, xsp, b.mul(bi, i64(n_sub * 4)), MV, align=4)
            out = out + [b.fadd(b.fmul(ml, xs, flags=FAST), vals[_NACC], flags=FAST)]
        return out

    finals = _ir.for_range(builder, i64(0), nb, inits, body)
    tot = finals[0]
    for v in finals[1:_NACC]:
        tot = builder.fadd(tot, v, flags=FAST)
    res = _ir.hsum(builder, tot)
    if has_min:
        res = builder.fsub(res, _ir.hsum(builder, finals[_NACC]), flags=FAST)
    return res


def _emit_dequant(builder, kind, row, outp, nb):
    """Write the floats of the row at ``row`` to ``outp`` (float32, contiguous):
    dl * q - ml with plain (unflagged) float32 operations, as numpy does."""
    _name, size, sub, has_min = _LAYOUT[kind]
    per = sub // 16

    def body(b, bi, vals):
        p = gep(b, row, b.mul(bi, i64(size)))
        dl, ml = _scales(b, kind, p)
        o = b.mul(bi, i64(QK_K * 4))
        for i, q in _pieces(b, kind, p):
            s = i // per
            v = b.fmul(splat(b, _lane(b, dl, s), 16), q)
            if has_min:
                v = b.fsub(v, splat(b, _lane(b, ml, s), 16))
            store(b, v, outp, b.add(o, i64(64 * i)))
        return []

    _ir.for_range(builder, i64(0), nb, [], body)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


@intrinsic
def _rowdot(typingctx, raw, r, x, xsum, kind):
    """float32 dot of row ``r`` of the packed matrix with x (xsum: per-sub-block sums of x)."""
    sig = types.float32(raw, r, x, xsum, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        xv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        xsv = _ir.ArrayView(context, builder, signature.args[3], args[3])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        kind_v = _as_i64(context, builder, signature.args[4], args[4])
        nb = builder.sdiv(xv.shape[0], i64(QK_K))
        cases = {k: (lambda b, k=k: _emit_rowdot(b, k, row, xv.data, xsv.data, nb)) for k in _LAYOUT}
        return _ir.switch(builder, kind_v, cases, F32, default=const(F32, float("nan")))

    return sig, codegen


@intrinsic
def _dequant_row(typingctx, raw, r, out, o, n, kind):
    """out[o, :n] = the floats of row ``r`` (n elements)."""
    sig = types.void(raw, r, out, o, n, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        outv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        orow = outv.row(builder, _as_i64(context, builder, signature.args[3], args[3]))
        n_v = _as_i64(context, builder, signature.args[4], args[4])
        kind_v = _as_i64(context, builder, signature.args[5], args[5])
        nb = builder.sdiv(n_v, i64(QK_K))
        cases = {k: (lambda b, k=k: _emit_dequant(b, k, row, orow, nb)) for k in _LAYOUT}
        _ir.switch(builder, kind_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _matvec(raw, x, out, kind, sub):
    """out[r] = row r . x; ``sub``: elements per sub-block whose x sums the kernel needs
    (0 for the types without mins)."""
    n = x.shape[0]
    ns = n // sub if sub > 0 else 0
    xsum = np.empty(max(ns, 1), np.float32)
    for s in range(ns):
        acc = np.float32(0.0)
        for j in range(sub):
            acc += x[s * sub + j]
        xsum[s] = acc
    for r in prange(raw.shape[0]):
        out[r] = _rowdot(raw, r, x, xsum, kind)


@njit(cache=True, parallel=True)
def _dequant_rows(raw, ids, out, kind):
    n = out.shape[1]
    for i in prange(ids.shape[0]):
        _dequant_row(raw, ids[i], out, i, n, kind)


@njit(cache=True, parallel=True)
def _matmul(raw, Xp, t_valid, n_in, out, kind):
    """out (T, rows) = X @ W.T: per work item, GEMM_ROWS rows are dequantised once into a
    float32 tile and multiplied by all tokens with the register-tiled micro-kernel."""
    n_out = raw.shape[0]
    k_pad = Xp.shape[1]
    G = GEMM_ROWS
    for g in prange((n_out + G - 1) // G):
        r0 = g * G
        nr = min(G, n_out - r0)
        buf = np.empty((G, k_pad), np.float32)
        for i in range(nr):
            _dequant_row(raw, r0 + i, buf, i, n_in, kind)
            for j in range(n_in, k_pad):
                buf[i, j] = 0.0
        for i in range(nr, G):
            for j in range(k_pad):
                buf[i, j] = 0.0
        gemm_rows(buf, nr, Xp, t_valid, out, r0)


def _register(name: str) -> None:
    kind = KINDS[name]
    _n, _size, sub, has_min = _LAYOUT[kind]
    xsum_group = sub if has_min else 0
    register_family_kernel(
        name,
        QK_K,
        TYPE_SIZE[name],
        lambda raw, x, out: _matvec(raw, x, out, kind, xsum_group),
        lambda raw, Xp, T, n_in, out: _matmul(raw, Xp, T, n_in, out, kind),
        lambda raw, ids, out: _dequant_rows(raw, ids, out, kind),
    )


for _name in KINDS:
    _register(_name)
