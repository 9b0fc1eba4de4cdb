"""Kernels for the unquantised element types F32, F16 and BF16 (block size 1).

Rows are processed 16 elements at a time (one SIMD vector: a load, a conversion — F16 by
the hardware half->float instruction where there is one, else exact bit arithmetic; BF16 by
a 16-bit shift — and an FMA into one of four rotating accumulators), then a scalar tail for
row lengths that are not a multiple of 16. Conversions are exact, so ``dequant_rows``
reproduces numpy's ``astype(float32)`` bit for bit (NaN stays NaN).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _ir
from ._ir import F32, I16, FAST, const, i64, load, store, vec
from ._ir import GEMM_ROWS, gemm_rows
from ._family import register_family_kernel

# kind id -> (name, bytes per element)
_LAYOUT = {0: ("F32", 4), 1: ("F16", 2), 2: ("BF16", 2)}
KINDS = {name: kind for kind, (name, _size) in _LAYOUT.items()}
ELEM_SIZE = {name: size for name, size in _LAYOUT.values()}

LANES = 16
V16F = vec(F32, LANES)
_NACC = 4


def _convert(builder, kind: int, p, offset, n: int | None):
    """Load n elements (or one, n=None) at p + offset bytes as float(s)."""
    if kind == 0:
        return load(builder, p, offset, V16F if n else F32, align=1)
    bits = load(builder, p, offset, vec(I16, n) if n else I16, align=1)
    if kind == 1:
        return _ir.f16_to_f32(builder, bits)
    return _ir.bf16_to_f32(builder, bits)


def _emit_rowdot(builder, kind, row, xp, n):
    size = _LAYOUT[kind][1]
    nvec = builder.sdiv(n, i64(LANES))

    def vbody(b, ci, accs):
        w = _convert(b, kind, row, b.mul(ci, i64(LANES * size)), LANES)
        xv = load(b, xp, b.mul(ci, i64(LANES * 4)), V16F, align=4)
        new = b.fadd(b.fmul(w, xv, flags=FAST), accs[0], flags=FAST)
        return _ir.rotate(accs, new)

    accs = _ir.for_range(builder, i64(0), nvec, [const(V16F, 0.0)] * _NACC, vbody)
    tot = accs[0]
    for v in accs[1:]:
        tot = builder.fadd(tot, v, flags=FAST)
    res = _ir.hsum(builder, tot)

    def sbody(b, ei, vals):
        w = _convert(b, kind, row, b.mul(ei, i64(size)), None)
        xs = load(b, xp, b.mul(ei, i64(4)), F32, align=4)
        return [b.fadd(b.fmul(w, xs, flags=FAST), vals[0], flags=FAST)]

    (res,) = _ir.for_range(builder, builder.mul(nvec, i64(LANES)), n, [res], sbody)
    return res


def _emit_dequant(builder, kind, row, outp, n):
    size = _LAYOUT[kind][1]
    nvec = builder.sdiv(n, i64(LANES))

    def vbody(b, ci, vals):
        store(b, _convert(b, kind, row, b.mul(ci, i64(LANES * size)), LANES), outp, b.mul(ci, i64(LANES * 4)))
        return []

    _ir.for_range(builder, i64(0), nvec, [], vbody)

    def sbody(b, ei, vals):
        store(b, _convert(b, kind, row, b.mul(ei, i64(size)), None), outp, b.mul(ei, i64(4)))
        return []

    _ir.for_range(builder, builder.mul(nvec, i64(LANES)), n, [], sbody)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


@intrinsic
def _rowdot(typingctx, raw, r, x, kind):
    sig = types.float32(raw, r, x, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        xv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        kind_v = _as_i64(context, builder, signature.args[3], args[3])
        n = xv.shape[0]
        cases = {k: (lambda b, k=k: _emit_rowdot(b, k, row, xv.data, n)) for k in _LAYOUT}
        return _ir.switch(builder, kind_v, cases, F32, default=const(F32, float("nan")))

    return sig, codegen


@intrinsic
def _dequant_row(typingctx, raw, r, out, o, n, kind):
    sig = types.void(raw, r, out, o, n, kind)

    def codegen(context, builder, signature, args):
        rawv = _ir.ArrayView(context, builder, signature.args[0], args[0])
        outv = _ir.ArrayView(context, builder, signature.args[2], args[2])
        row = rawv.row(builder, _as_i64(context, builder, signature.args[1], args[1]))
        orow = outv.row(builder, _as_i64(context, builder, signature.args[3], args[3]))
        n = _as_i64(context, builder, signature.args[4], args[4])
        kind_v = _as_i64(context, builder, signature.args[5], args[5])
        cases = {k: (lambda b, k=k: _emit_dequant(b, k, row, orow, n)) for k in _LAYOUT}
        _ir.switch(builder, kind_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _matvec(raw, x, out, kind):
    for r in prange(raw.shape[0]):
        out[r] = _rowdot(raw, r, x, kind)


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
        1,
        ELEM_SIZE[name],
        lambda raw, x, out: _matvec(raw, x, out, kind),
        lambda raw, Xp, T, n_in, out: _matmul(raw, Xp, T, n_in, out, kind),
        lambda raw, ids, out: _dequant_rows(raw, ids, out, kind),
    )


for _name in KINDS:
    _register(_name)
