"""Kernels for the group-wise integer blocks I{bits}G{group} (qconvert/blocks/groupwise.py).

Layout (FORMAT.md §7, one block = one group of one row, all little-endian):
  scale:f16 | zero:u8 | qs[bits * group / 8]        x = (q - zero) * scale
  element i of qs sits at bit offset i * bits, least significant bit first (3-bit elements
  may straddle two bytes). bits in {2, 3, 4, 8}, group in {32, 64, 128}.

Decoding for the matvec kernel works on bit planes, 16 lanes at a time (``_dot_plan``):
a "unit" is one byte of qs (2, 4, 8 bits: 4, 2, 1 elements) or one 3-byte word (3 bits: 8
elements); up to 16 consecutive units are widened to 32-bit lanes (3-byte words assembled
from a u32-word load with two permutes and shifts), and plane k (the element at bit
k * bits of every unit) is one uniform shift and an and. The kernel therefore visits the
elements of a block in plane order (4 bits: the even elements of 32, then the odd ones),
and x is permuted into that order once per call. On AVX-512 a 4-bit block of 128 costs 4
byte->dword widenings plus, per 16 weights, a shift, an and, a subtraction of the zero, a
conversion and a multiply-add. ``dequant_rows`` must write element order, so it decodes 16
consecutive elements with a shuffle that puts each lane's byte (and, for straddling 3-bit
elements, the next byte) in place and a per-lane shift (``_decode16``). ``q - zero`` is
always formed in integers (exact) before the conversion to float. LLVM splits the 16-lane
vectors on narrower targets (AVX2: same speed relative to Q4_0).

Arithmetic: exact float math on the weights, no activation quantisation (as legacy.py).
matvec: per block t = sum_i (q_i - zero) x_i as 16-lane products summed in a tree, then
acc += scale * t (4 rotating accumulators), then a horizontal sum. Against
``W_dequant @ x`` only the float32 rounding order differs (bounded in tests/test_groupwise.py).
dequant_rows: ``f32(q - zero) * f32(scale)``, one unflagged multiplication: bit-identical
to the codec (the product is exact in float32). Batched products (T >= SMALL_T) dequantise
GEMM_ROWS rows into a float32 tile and multiply it by all tokens with the register-tiled
micro-kernel of ``_ir``, as legacy.py does.

One numba function per operation serves all twelve types: the type is a run-time ``kind``
that selects one of twelve specialised loops (one compile, not twelve).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _ir
from ._ir import F32, I8, I16, I32, FAST, const, gep, i64, load, splat, store, vec
from ._ir import GEMM_ROWS, gemm_rows
from ._family import register_family_kernel

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
# kind -> (name, bits, group, type_size); kinds are 0..11 in (bits, group) order
_LAYOUT = {
    k: (f"I{b}G{g}", b, g, 3 + b * g // 8)
    for k, (b, g) in enumerate((b, g) for b in BITS for g in GROUPS)
}
KINDS = {name: kind for kind, (name, *_rest) in _LAYOUT.items()}
TYPE_SIZE = {name: size for name, _b, _g, size in _LAYOUT.values()}
BLOCK_SIZE = {name: g for name, _b, g, _s in _LAYOUT.values()}

V16F = vec(F32, 16)
V16I = vec(I32, 16)
_QS = 3  # offset of qs in a block


def _c16(values):
    return const(V16I, values)


def _units(bits: int) -> tuple[int, int]:
    """(bytes, elements) of the smallest whole-byte run of qs: 1 byte holds 8/bits elements
    for 2, 4 and 8 bits; 3 bytes hold 8 elements for 3 bits."""
    return (3, 8) if bits == 3 else (1, 8 // bits)


def _dot_plan(bits: int, group: int) -> list[tuple[int, list[int], list[int]]]:
    """How the matvec kernel walks a block, 16 lanes at a time: a list of pieces
    ``(first unit, unit of each lane relative to it, plane of each lane)``. A unit is the
    byte (or 3-byte word) of :func:`_units`; plane k of a unit is its element k, at bit
    offset k * bits. Up to 16 consecutive units are widened to one vector of 32-bit lanes;
    each piece is that vector (shuffled only when a block has fewer than 16 units) shifted
    right by the plane's bit offset and masked, so no per-element shuffle is needed. The
    element of lane l is ``unit * elements_per_unit + plane``; x is permuted into this
    order once per call (``_matvec``)."""
    _nb, epu = _units(bits)
    n_units = group // epu
    C = min(16, n_units)
    P = 16 // C  # planes per piece
    plan = []
    for c0 in range(0, n_units, C):
        for h in range(epu // P):
            plan.append((c0, [l % C for l in range(16)], [P * h + l // C for l in range(16)]))
    return plan


def _dot_order(bits: int, group: int) -> list[int]:
    """The element of every lane of :func:`_dot_plan`, in order: a permutation of 0..group-1."""
    _nb, epu = _units(bits)
    return [epu * (c0 + u) + k for c0, us, ks in _dot_plan(bits, group) for u, k in zip(us, ks)]


def _unit_words(b, bits: int, p, c0: int, n: int):
    """<n x i32>: units c0 .. c0+n-1 of the qs of the block at ``p``. 3-byte units: the
    3n bytes are loaded as 3n/4 little-endian u32 words; unit u starts at bit 24u, i.e. at
    bit 24u % 32 of word 24u // 32, and is (word >> off) | (next word << (32 - off)) (its
    top 8 bits are garbage the plane masks drop)."""
    ub, _epu = _units(bits)
    if ub == 1:
        return b.zext(load(b, p, _QS + c0, vec(I8, n)), vec(I32, n))
    nw = 3 * n // 4
    words = load(b, p, _QS + 3 * c0, vec(I32, nw))
    vn = vec(I32, n)
    idx = [(24 * u) >> 5 for u in range(n)]
    off = [(24 * u) & 31 for u in range(n)]
    lo = b.lshr(b.shuffle_vector(words, words, const(vn, idx)), const(vn, off))
    nxt = [min(i + 1, nw - 1) for i in idx]
    hi = b.shl(b.shuffle_vector(words, words, const(vn, nxt)), const(vn, [(32 - o) & 31 for o in off]))
    # off == 0: the unit lies in one word; the shl by 0 would add the next word's bits at
    # the bottom, so those lanes take 0 from ``hi``
    hi = b.and_(hi, const(vn, [0 if o == 0 else -1 for o in off]))
    return b.or_(lo, hi)


def _dot_pieces(b, bits: int, group: int, p):
    """Yield <16 x i32> q of each piece of :func:`_dot_plan`, in order."""
    words = {}
    for c0, us, ks in _dot_plan(bits, group):
        n = max(us) + 1
        if c0 not in words:
            words[c0] = _unit_words(b, bits, p, c0, n)
        w = words[c0]
        v = w if us == list(range(16)) else b.shuffle_vector(w, w, _c16(us))
        if any(ks):
            v = b.lshr(v, _c16([bits * k for k in ks]))
        yield v if bits == 8 else b.and_(v, _c16((1 << bits) - 1))


def _decode16(b, bits: int, p, elems: list[int]):
    """<16 x i32> q values of the 16 elements ``elems`` of the block at i8* ``p``: load the
    bytes they occupy as one vector, widen, shuffle each lane's byte (plus the next one for
    straddling 3-bit elements) into place, shift each lane, mask. Identity shuffles and
    uniform shifts fold away."""
    pos = [((e * bits) >> 3, (e * bits) & 7) for e in elems]
    lo_byte = min(bp for bp, _s in pos)
    hi_byte = max(bp + (1 if s + bits > 8 else 0) for bp, s in pos)
    nbytes = hi_byte - lo_byte + 1
    w = b.zext(load(b, p, _QS + lo_byte, vec(I8, nbytes)), vec(I32, nbytes))
    first = [bp - lo_byte for bp, _s in pos]
    v = w if first == list(range(nbytes)) and nbytes == 16 else b.shuffle_vector(w, w, _c16(first))
    if any(s + bits > 8 for _bp, s in pos):  # straddling elements (3 bits): add the next byte
        nxt = [min(f + 1, nbytes - 1) for f in first]
        v = b.or_(v, b.shl(b.shuffle_vector(w, w, _c16(nxt)), _c16(8)))
    shifts = [s for _bp, s in pos]
    if any(shifts):
        v = b.lshr(v, _c16(shifts))
    if bits == 8:
        return v
    return b.and_(v, _c16((1 << bits) - 1))


def _centred(b, bits: int, p, elems: list[int], zero_v):
    """float <16 x float> (q - zero) of the 16 elements ``elems`` (exact)."""
    return b.sitofp(b.sub(_decode16(b, bits, p, elems), zero_v), V16F)


def _head(b, p):
    """(scale as float, zero splatted to <16 x i32>) of the block at ``p``."""
    scale = _ir.f16_to_f32(b, load(b, p, 0, I16))
    zero = b.zext(load(b, p, 2, I8), I32)
    return scale, splat(b, zero, 16)


_NACC = 4  # rotating accumulators per row


def _tree_sum(b, vals):
    while len(vals) > 1:
        nxt = [b.fadd(vals[i], vals[i + 1], flags=FAST) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def _emit_rowdot(builder, kind, row, xp, nb):
    """sum over the blocks of the row at ``row`` of scale * sum (q - zero) x; a float."""
    _name, bits, group, size = _LAYOUT[kind]
    inits = [const(V16F, 0.0)] * _NACC

    def body(b, bi, accs):
        p = gep(b, row, b.mul(bi, i64(size)))
        scale, zero_v = _head(b, p)
        xo = b.mul(bi, i64(group * 4))
        prods = []
        for c, q in enumerate(_dot_pieces(b, bits, group, p)):
            xv = load(b, xp, b.add(xo, i64(64 * c)), V16F, align=4)
            w = b.sitofp(b.sub(q, zero_v), V16F)
            prods.append(b.fmul(w, xv, flags=FAST))
        t = _tree_sum(b, prods)
        new = b.fadd(b.fmul(splat(b, scale, 16), t, flags=FAST), accs[0], flags=FAST)
        return _ir.rotate(accs, new)

    finals = _ir.for_range(builder, i64(0), nb, inits, body)
    return _ir.hsum(builder, _tree_sum(builder, list(finals)))


def _emit_dequant(builder, kind, row, outp, nb):
    """Write the floats of the row at ``row`` to ``outp`` (float32, contiguous)."""
    _name, bits, group, size = _LAYOUT[kind]

    def body(b, bi, vals):
        p = gep(b, row, b.mul(bi, i64(size)))
        scale, zero_v = _head(b, p)
        sv = splat(b, scale, 16)
        o = b.mul(bi, i64(group * 4))
        for c in range(group // 16):
            elems = list(range(16 * c, 16 * c + 16))
            v = b.fmul(_centred(b, bits, p, elems, zero_v), sv)  # no fast flags: exact product
            store(b, v, outp, b.add(o, i64(64 * c)))
        return []

    _ir.for_range(builder, i64(0), nb, [], body)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


def _blocks(builder, n, kind):
    """Blocks per row of n elements (n a multiple of the group: checked by linear())."""
    return builder.sdiv(n, i64(_LAYOUT[kind][2]))


@intrinsic
def _rowdot(typingctx, raw, r, x, kind):
    """float32 dot of row ``r`` of the packed matrix with x."""
    sig = types.float32(raw, r, x, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        xv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        kind_v = _as_i64(context, builder, signature.args[3], args[3])
        cases = {
            k: (lambda b, k=k: _emit_rowdot(b, k, row, xv.data, _blocks(b, xv.shape[0], k))) for k in _LAYOUT
        }
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
        cases = {k: (lambda b, k=k: _emit_dequant(b, k, row, orow, _blocks(b, n_v, k))) for k in _LAYOUT}
        _ir.switch(builder, kind_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _matvec(raw, x, out, kind, order):
    """out[r] = row r . x; ``order``: the kernel's element order within a group (empty when
    it is the identity): x is permuted to it once, here."""
    g = order.shape[0]
    if g > 0:
        xo = np.empty_like(x)
        for b0 in range(0, x.shape[0], g):
            for j in range(g):
                xo[b0 + j] = x[b0 + order[j]]
    else:
        xo = x
    for r in prange(raw.shape[0]):
        out[r] = _rowdot(raw, r, xo, kind)


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
    _n, bits, group, _size = _LAYOUT[kind]
    order = np.array(_dot_order(bits, group), np.int64)
    if np.array_equal(order, np.arange(group)):
        order = np.zeros(0, np.int64)
    register_family_kernel(
        name,
        BLOCK_SIZE[name],
        TYPE_SIZE[name],
        lambda raw, x, out: _matvec(raw, x, out, kind, order),
        lambda raw, Xp, T, n_in, out: _matmul(raw, Xp, T, n_in, out, kind),
        lambda raw, ids, out: _dequant_rows(raw, ids, out, kind),
    )


for _name in KINDS:
    _register(_name)
