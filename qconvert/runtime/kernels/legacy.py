"""Kernels for GGML's 32-element "legacy" blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Layouts (ANCHORS.md §B1, all little-endian, d and m are IEEE half):
  Q4_0  d | qs[16]              x = (q - 8) * d     q = nibble
  Q4_1  d | m | qs[16]          x = q * d + m
  Q5_0  d | qh:u32 | qs[16]     x = (q - 16) * d    q = nibble | bit_j(qh) << 4
  Q5_1  d | m | qh:u32 | qs[16] x = q * d + m
  Q8_0  d | qs[32]:i8           x = q * d
  qs byte j holds element j in its low nibble and element j + 16 in its high nibble.

Arithmetic: exact float math on the weights, no activation quantisation. Per block the
kernel forms t = sum_j q_j * x_j over 32 elements as a 16-lane vector (q as float; the
"- 8"/"- 16" is done in integers, so it is exact), then acc += d * t, and for the types with
a minimum, acc_m += m * sum(x_block). The only difference from ``W_dequant @ x`` is float32
rounding order (bounded in tests/test_kernels.py). We measured the llama.cpp alternative
(x quantised to int8 blocks, integer dot products): with generic LLVM vectors it was no
faster on AVX-512 (LLVM does not form VNNI instructions from them) and it costs ~0.5 %
relative error, so it is not used.

Measured alternatives not taken: x quantised to int8 blocks with integer dot products
(llama.cpp's way) was no faster with generic LLVM vectors (LLVM forms no VNNI instructions
from them) and costs ~0.5 % relative error, which would contaminate the quality numbers
qconvert reports for the weight quantisation; an AVX-512-only vpermps nibble->float table
gained ~15 % on Q4_0 and was dropped to keep one, tested, code path.

Batched products (T >= SMALL_T tokens): ``_matmul`` dequantises GEMM_ROWS rows at a time into
a float32 tile (exactly the codec's values) and multiplies it by all tokens with the
register-tiled micro-kernel of ``_ir`` (~90-100 GFLOP/s per core on AVX-512), so every
weight is decoded once per call and no BLAS threads are involved.

One numba function per operation serves all five types: the block type is a run-time
``kind`` that selects one of five specialised loops (one compile, not five).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _ir
from ._ir import F32, I8, I32, FAST, const, gep, i64, load, splat, store, vec
from ._ir import GEMM_ROWS, gemm_rows
from ._family import register_family_kernel

QK = 32
# kind id -> (name, type_size, offset of d, offset of m or None, offset of qh or None, offset of qs)
_LAYOUT = {
    0: ("Q4_0", 18, 0, None, None, 2),
    1: ("Q4_1", 20, 0, 2, None, 4),
    2: ("Q5_0", 22, 0, None, 2, 6),
    3: ("Q5_1", 24, 0, 2, 4, 8),
    4: ("Q8_0", 34, 0, None, None, 2),
}
KINDS = {name: kind for kind, (name, *_rest) in _LAYOUT.items()}
TYPE_SIZE = {name: size for name, size, *_rest in _LAYOUT.values()}

V16F = vec(F32, 16)
V16I = vec(I32, 16)


def _decode(builder, kind: int, p):
    """Block at i8* ``p`` -> (w_lo, w_hi, d, m): w = the quant values of elements 0..15 and
    16..31 as float vectors (already centred for the _0 types), d the scale, m the min or None."""
    _name, _size, off_d, off_m, off_qh, off_qs = _LAYOUT[kind]
    d = _ir.f16_to_f32(builder, load(builder, p, off_d, _ir.I16))
    m = _ir.f16_to_f32(builder, load(builder, p, off_m, _ir.I16)) if off_m is not None else None
    if kind == 4:  # Q8_0
        q = builder.sext(load(builder, p, off_qs, vec(I8, 32)), vec(I32, 32))
        lo, hi = _ir.lanes(builder, q, 0, 16), _ir.lanes(builder, q, 16, 16)
    else:
        q = builder.zext(load(builder, p, off_qs, vec(I8, 16)), V16I)
        lo = builder.and_(q, const(V16I, 15))
        hi = builder.lshr(q, const(V16I, 4))
        if off_qh is not None:
            # fifth bit of element j = bit j of qh: a lane test + a masked or (2 ops on AVX-512)
            qh = splat(builder, load(builder, p, off_qh, I32), 16)
            sixteen = const(V16I, 16)
            halves = []
            for first, val in ((0, lo), (16, hi)):
                bits = const(V16I, [(1 << j) - (1 << 32 if j == 31 else 0) for j in range(first, first + 16)])
                has = builder.icmp_unsigned("!=", builder.and_(qh, bits), const(V16I, 0))
                halves.append(builder.select(has, builder.or_(val, sixteen), val))
            lo, hi = halves
        if m is None:  # symmetric: centre in integers (exact)
            centre = const(V16I, 8 if off_qh is None else 16)
            lo = builder.sub(lo, centre)
            hi = builder.sub(hi, centre)
    return builder.sitofp(lo, V16F), builder.sitofp(hi, V16F), d, m


_NACC = 4  # rotating accumulators per row


def _emit_rowdot(builder, kind, row, xp, xsp, nb):
    """sum over blocks of the row at ``row`` times x; returns a float."""
    has_min = _LAYOUT[kind][3] is not None
    size = _LAYOUT[kind][1]
    zero_v = const(V16F, 0.0)
    zero_s = const(F32, 0.0)
    inits = [zero_v] * _NACC + ([zero_s] * _NACC if has_min else [])

    def body(b, bi, vals):
        accs = vals[:_NACC]
        p = gep(b, row, b.mul(bi, i64(size)))
        w_lo, w_hi, d, m = _decode(b, kind, p)
        xo = b.mul(bi, i64(QK * 4))
        x_lo = load(b, xp, xo, V16F, align=4)
        x_hi = load(b, xp, b.add(xo, i64(64)), V16F, align=4)
        t = b.fadd(b.fmul(w_lo, x_lo, flags=FAST), b.fmul(w_hi, x_hi, flags=FAST), flags=FAST)
        new = b.fadd(b.fmul(splat(b, d, 16), t, flags=FAST), accs[0], flags=FAST)
        out = _ir.rotate(accs, new)
        if has_min:
            maccs = vals[_NACC:]
            xs = load(b, xsp, b.mul(bi, i64(4)), F32, align=4)
            mnew = b.fadd(b.fmul(m, xs, flags=FAST), maccs[0], flags=FAST)
            out += _ir.rotate(maccs, mnew)
        return out

    finals = _ir.for_range(builder, i64(0), nb, inits, body)
    tot = finals[0]
    for v in finals[1:_NACC]:
        tot = builder.fadd(tot, v, flags=FAST)
    res = _ir.hsum(builder, tot)
    for s in finals[_NACC:]:
        res = builder.fadd(res, s, flags=FAST)
    return res


def _emit_dequant(builder, kind, row, outp, nb):
    """Write the floats of the row at ``row`` to ``outp`` (float32, contiguous)."""
    size = _LAYOUT[kind][1]

    def body(b, bi, vals):
        p = gep(b, row, b.mul(bi, i64(size)))
        w_lo, w_hi, d, m = _decode(b, kind, p)
        dv = splat(b, d, 16)
        v_lo, v_hi = b.fmul(dv, w_lo), b.fmul(dv, w_hi)  # no fast flags: numpy's float32 d * q
        if m is not None:
            mv = splat(b, m, 16)
            v_lo, v_hi = b.fadd(v_lo, mv), b.fadd(v_hi, mv)
        o = b.mul(bi, i64(QK * 4))
        store(b, v_lo, outp, o)
        store(b, v_hi, outp, b.add(o, i64(64)))
        return []

    _ir.for_range(builder, i64(0), nb, [], body)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


@intrinsic
def _rowdot(typingctx, raw, r, x, xsum, kind):
    """float32 dot of row ``r`` of the packed matrix with x (xsum: per-block sums of x)."""
    sig = types.float32(raw, r, x, xsum, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        xv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        xsv = _ir.ArrayView(context, builder, signature.args[3], args[3])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        kind_v = _as_i64(context, builder, signature.args[4], args[4])
        nb = builder.sdiv(xv.shape[0], i64(QK))
        cases = {
            k: (lambda b, k=k: _emit_rowdot(b, k, row, xv.data, xsv.data, nb)) for k in _LAYOUT
        }
        return _ir.switch(builder, kind_v, cases, F32, default=const(F32, float("nan")))

    return sig, codegen


@intrinsic
def _dequant_row(typingctx, raw, r, out, o, n, kind):
    """out[o, :] = the floats of row ``r`` (out.shape[1] elements)."""
    sig = types.void(raw, r, out, o, n, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        outv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        orow = outv.row(builder, _as_i64(context, builder, signature.args[3], args[3]))
        n_v = _as_i64(context, builder, signature.args[4], args[4])
        kind_v = _as_i64(context, builder, signature.args[5], args[5])
        nb = builder.sdiv(n_v, i64(QK))
        cases = {k: (lambda b, k=k: _emit_dequant(b, k, row, orow, nb)) for k in _LAYOUT}
        _ir.switch(builder, kind_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _matvec(raw, x, out, kind):
    nb = x.shape[0] // QK
    xsum = np.empty(nb, np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(QK):
            s += x[b * QK + j]
        xsum[b] = s
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
    register_family_kernel(
        name,
        QK,
        TYPE_SIZE[name],
        lambda raw, x, out: _matvec(raw, x, out, kind),
        lambda raw, Xp, T, n_in, out: _matmul(raw, Xp, T, n_in, out, kind),
        lambda raw, ids, out: _dequant_rows(raw, ids, out, kind),
    )


for _name in KINDS:
    _register(_name)
