"""Kernels for bitsandbytes' NF4 blocks: NF4 and NF4_DQ (qconvert/blocks/nf4.py, FORMAT.md).

Layouts (64 weights per block; qs byte j = element 2j in the high nibble, 2j+1 in the low):
  NF4     absmax:f32 | qs[32]    (36 bytes)   x = NF4[q] * absmax
  NF4_DQ  qa:u8 | qs[32]         (33 bytes)   x = NF4[q] * (DYN[qa] * absmax2[g] + offset)
NF4_DQ's ``absmax2`` (one f32 per 256 blocks of the flattened tensor; block b of row r is
flat block r * blocks_per_row + b, g = that // 256) and ``offset`` are the tensor's params:
the runtime turns them once into the kernel's ``aux`` (:func:`prepare_dq`), which
``linear``/``embedding_rows`` pass on (see kernels/__init__.py).

Per block the kernels load the 32 code bytes as one vector, split the nibbles and interleave
them into element order, and turn each 16 codes into 16 floats with a table lookup: one
``vpermps`` on AVX-512 (the 16-entry table is one register), two 8-entry ``vpermps`` and a
blend on AVX2, a select tree elsewhere (all three checked in tests/test_nf4.py). Measured on
a 1536x576 matvec, 1 thread (AVX-512 Zen 4): 62 us with vpermps, 122 us with the AVX2 form,
229 us with the select tree; Q4_0 takes 55 us.

Arithmetic: ``dequant_rows`` reproduces the codec bit for bit (float32 ``DYN[qa] * absmax2``,
then ``+ offset``, then ``NF4[q] * absmax``; no fast-math, so no FMA). ``matvec`` forms
t = sum_j NF4[q_j] x_j per block in 16 lanes, then acc += absmax * t, so it differs from
``W_dequant @ x`` only by float32 rounding order (bounded in tests/test_nf4.py like the
legacy kernels). Batched products (T >= SMALL_T) dequantise GEMM_ROWS rows into a float32
tile and use the register-tiled micro-kernel of ``_ir``, as the legacy kernels do.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...blocks.nf4 import DQ_BLOCK, DYNAMIC_CODE, NF4_VALUES, dq_state
from ...errors import QConvertError
from . import _ir
from ._ir import F32, I8, I32, FAST, const, gep, i64, load, splat, store, vec
from ._ir import GEMM_ROWS, gemm_operand, gemm_rows, k_padded
from . import SMALL_T, register_kernel

QK = 64
NF4_SIZE = 36
DQ_SIZE = 33
# kind -> (name, type_size, offset of qs)
_LAYOUT = {0: ("NF4", NF4_SIZE, 4), 1: ("NF4_DQ", DQ_SIZE, 1)}
KINDS = {name: kind for kind, (name, _s, _o) in _LAYOUT.items()}

_T = np.ascontiguousarray(NF4_VALUES, dtype=np.float32)
_DYN = np.ascontiguousarray(DYNAMIC_CODE, dtype=np.float32)
_NO_ABSMAX2 = np.zeros(1, np.float32)  # NF4 (no double quantization) passes this

V16F = vec(F32, 16)
V16I = vec(I32, 16)
# element order of a block from its 32 code bytes: hi nibble of byte j, then its lo nibble
_INTERLEAVE = [k for j in range(32) for k in (j, 32 + j)]


def _lookup_tree(builder, idx):
    """NF4_VALUES[idx] for a <16 x i32> of indices 0..15 in generic vector IR: a select tree
    on the four bits (4 bit tests + 15 blends per 16 weights; any SIMD target)."""
    level = [const(V16F, float(v)) for v in NF4_VALUES]
    for bit in range(4):
        has = builder.icmp_unsigned("!=", builder.and_(idx, const(V16I, 1 << bit)), const(V16I, 0))
        level = [builder.select(has, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


def _x86(builder, name: str, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _lookup_avx512(builder, idx):
    """One vpermps: the 16-entry table is one zmm register."""
    return _x86(builder, "llvm.x86.avx512.permvar.sf.512", V16F, [const(V16F, [float(v) for v in NF4_VALUES]), idx])


def _lookup_avx2(builder, idx):
    """Per 8 lanes, two 8-entry vpermps (they read the low 3 bits) and a blend on bit 3."""
    v8f, v8i = vec(F32, 8), vec(I32, 8)
    lo_t = const(v8f, [float(v) for v in NF4_VALUES[:8]])
    hi_t = const(v8f, [float(v) for v in NF4_VALUES[8:]])
    halves = []
    for h in range(2):
        i8 = _ir.lanes(builder, idx, 8 * h, 8)
        a = _x86(builder, "llvm.x86.avx2.permps", v8f, [lo_t, i8])
        b = _x86(builder, "llvm.x86.avx2.permps", v8f, [hi_t, i8])
        high = builder.icmp_unsigned("!=", builder.and_(i8, const(v8i, 8)), const(v8i, 0))
        halves.append(builder.select(high, b, a))
    return _ir.concat(builder, halves[0], halves[1])


#: the table lookup the kernels use on this host (timings in the module docstring). numba's
#: cache is keyed on the target CPU and its features, so a cached kernel never crosses hosts.
LOOKUPS = {"avx512": _lookup_avx512, "avx2": _lookup_avx2, "tree": _lookup_tree}
LOOKUP = "avx512" if _ir._host_has("avx512f") else "avx2" if _ir._host_has("avx2") else "tree"
_lookup = LOOKUPS[LOOKUP]


def make_lookup_probe(mode: str):
    """numba-callable ``probe(idx int32[16], out float32[16])`` running lookup ``mode``
    (tests check every mode the host can run against NF4_VALUES)."""
    fn = LOOKUPS[mode]

    @intrinsic
    def probe(typingctx, idx, out):
        sig = types.void(idx, out)

        def codegen(context, builder, signature, args):
            iv = _ir.ArrayView(context, builder, signature.args[0], args[0])
            ov = _ir.ArrayView(context, builder, signature.args[1], args[1])
            store(builder, fn(builder, load(builder, iv.data, 0, V16I, align=4)), ov.data, 0)
            return context.get_dummy_value()

        return sig, codegen

    return probe


def _decode(builder, kind, p, blk, dynp, a2p, offset):
    """Block at i8* ``p`` (flat block index ``blk``) -> (four <16 x float> NF4 values of
    elements 0..15, 16..31, 32..47, 48..63, scale). The NF4_DQ scale is computed without
    fast-math flags: DYN[qa] * absmax2[blk // 256] + offset, as the codec does."""
    _name, _size, off_qs = _LAYOUT[kind]
    if kind == 0:
        scale = load(builder, p, 0, F32)
    else:
        qa = builder.zext(load(builder, p, 0, I8), ir.IntType(64))
        c = load(builder, dynp, builder.mul(qa, i64(4)), F32, align=4)
        g = builder.lshr(blk, i64(8))  # DQ_BLOCK == 256
        a2 = load(builder, a2p, builder.mul(g, i64(4)), F32, align=4)
        scale = builder.fadd(builder.fmul(c, a2), offset)
    q = load(builder, p, off_qs, vec(I8, 32))
    hi = builder.lshr(q, const(vec(I8, 32), 4))
    lo = builder.and_(q, const(vec(I8, 32), 15))
    codes = builder.shuffle_vector(hi, lo, ir.Constant(vec(I32, 64), _INTERLEAVE))
    ws = [_lookup(builder, builder.zext(_ir.lanes(builder, codes, 16 * k, 16), V16I)) for k in range(4)]
    return ws, scale


_NACC = 4  # rotating accumulators per row


def _emit_rowdot(builder, kind, row, blk0, xp, nb, dynp, a2p, offset):
    size = _LAYOUT[kind][1]

    def body(b, bi, accs):
        p = gep(b, row, b.mul(bi, i64(size)))
        ws, scale = _decode(b, kind, p, b.add(blk0, bi), dynp, a2p, offset)
        xo = b.mul(bi, i64(QK * 4))
        t = None
        for k in range(4):
            xv = load(b, xp, b.add(xo, i64(64 * k)), V16F, align=4)
            prod = b.fmul(ws[k], xv, flags=FAST)
            t = prod if t is None else b.fadd(t, prod, flags=FAST)
        new = b.fadd(b.fmul(splat(b, scale, 16), t, flags=FAST), accs[0], flags=FAST)
        return _ir.rotate(accs, new)

    finals = _ir.for_range(builder, i64(0), nb, [const(V16F, 0.0)] * _NACC, body)
    tot = finals[0]
    for v in finals[1:]:
        tot = builder.fadd(tot, v, flags=FAST)
    return _ir.hsum(builder, tot)


def _emit_dequant(builder, kind, row, blk0, outp, nb, dynp, a2p, offset):
    size = _LAYOUT[kind][1]

    def body(b, bi, vals):
        p = gep(b, row, b.mul(bi, i64(size)))
        ws, scale = _decode(b, kind, p, b.add(blk0, bi), dynp, a2p, offset)
        sv = splat(b, scale, 16)
        o = b.mul(bi, i64(QK * 4))
        for k in range(4):
            store(b, b.fmul(ws[k], sv), outp, b.add(o, i64(64 * k)))  # no fast-math: exact
        return []

    _ir.for_range(builder, i64(0), nb, [], body)


def _as_i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


def _f32(context, builder, ty, val):
    return context.cast(builder, val, ty, types.float32)


@intrinsic
def _rowdot(typingctx, raw, r, x, dyn, absmax2, offset, kind):
    """float32 dot of row ``r`` of the packed matrix with x."""
    sig = types.float32(raw, r, x, dyn, absmax2, offset, kind)

    def codegen(context, builder, signature, args):
        a = signature.args
        rawv = _ir.ArrayView(context, builder, a[0], args[0])
        xv = _ir.ArrayView(context, builder, a[2], args[2])
        dynv = _ir.ArrayView(context, builder, a[3], args[3])
        a2v = _ir.ArrayView(context, builder, a[4], args[4])
        off = _f32(context, builder, a[5], args[5])
        r_v = _as_i64(context, builder, a[1], args[1])
        row = rawv.row(builder, r_v)
        kind_v = _as_i64(context, builder, a[6], args[6])
        nb = builder.sdiv(xv.shape[0], i64(QK))
        blk0 = builder.mul(r_v, nb)
        cases = {
            k: (lambda b, k=k: _emit_rowdot(b, k, row, blk0, xv.data, nb, dynv.data, a2v.data, off)) for k in _LAYOUT
        }
        return _ir.switch(builder, kind_v, cases, F32, default=const(F32, float("nan")))

    return sig, codegen


@intrinsic
def _dequant_row(typingctx, raw, r, out, o, n, dyn, absmax2, offset, kind):
    """out[o, :n] = the floats of row ``r``."""
    sig = types.void(raw, r, out, o, n, dyn, absmax2, offset, kind)

    def codegen(context, builder, signature, args):
        a = signature.args
        rawv = _ir.ArrayView(context, builder, a[0], args[0])
        outv = _ir.ArrayView(context, builder, a[2], args[2])
        dynv = _ir.ArrayView(context, builder, a[5], args[5])
        a2v = _ir.ArrayView(context, builder, a[6], args[6])
        off = _f32(context, builder, a[7], args[7])
        r_v = _as_i64(context, builder, a[1], args[1])
        row = rawv.row(builder, r_v)
        orow = outv.row(builder, _as_i64(context, builder, a[3], args[3]))
        nb = builder.sdiv(_as_i64(context, builder, a[4], args[4]), i64(QK))
        blk0 = builder.mul(r_v, nb)
        kind_v = _as_i64(context, builder, a[8], args[8])
        cases = {
            k: (lambda b, k=k: _emit_dequant(b, k, row, blk0, orow, nb, dynv.data, a2v.data, off)) for k in _LAYOUT
        }
        _ir.switch(builder, kind_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _matvec(raw, x, dyn, absmax2, offset, out, kind):
    for r in prange(raw.shape[0]):
        out[r] = _rowdot(raw, r, x, dyn, absmax2, offset, kind)


@njit(cache=True, parallel=True)
def _dequant_rows(raw, ids, out, dyn, absmax2, offset, kind):
    n = out.shape[1]
    for i in prange(ids.shape[0]):
        _dequant_row(raw, ids[i], out, i, n, dyn, absmax2, offset, kind)


@njit(cache=True, parallel=True)
def _matmul(raw, Xp, t_valid, n_in, dyn, absmax2, offset, out, kind):
    """out (T, rows) = X @ W.T, GEMM_ROWS rows dequantised per work item (as kernels/legacy.py)."""
    n_out = raw.shape[0]
    k_pad = Xp.shape[1]
    G = GEMM_ROWS
    for g in prange((n_out + G - 1) // G):
        r0 = g * G
        nr = min(G, n_out - r0)
        buf = np.empty((G, k_pad), np.float32)
        for i in range(nr):
            _dequant_row(raw, r0 + i, buf, i, n_in, dyn, absmax2, offset, kind)
            for j in range(n_in, k_pad):
                buf[i, j] = 0.0
        for i in range(nr, G):
            for j in range(k_pad):
                buf[i, j] = 0.0
        gemm_rows(buf, nr, Xp, t_valid, out, r0)


_ZERO = np.float32(0.0)


def matvec_nf4(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.empty(raw.shape[0], np.float32)
    _matvec(raw, x, _DYN, _NO_ABSMAX2, _ZERO, out, 0)
    return out


def matmul_nf4(raw: np.ndarray, X: np.ndarray) -> np.ndarray:
    T, n_in = X.shape
    if T < SMALL_T:
        return np.stack([matvec_nf4(raw, X[t]) for t in range(T)])
    out = np.empty((T, raw.shape[0]), np.float32)
    _matmul(raw, gemm_operand(X, k_padded(n_in)), T, n_in, _DYN, _NO_ABSMAX2, _ZERO, out, 0)
    return out


def dequant_rows_nf4(raw: np.ndarray, ids: np.ndarray, row_length: int, out=None) -> np.ndarray:
    if out is None:
        out = np.empty((ids.shape[0], row_length), np.float32)
    _dequant_rows(raw, ids, out, _DYN, _NO_ABSMAX2, _ZERO, 0)
    return out


class DQAux:
    """What an NF4_DQ kernel needs besides the packed bytes: the tensor's double-quantization
    state (float32 ``offset``, ``absmax2`` per 256 blocks of the flattened tensor)."""

    __slots__ = ("offset", "absmax2", "n_blocks")

    def __init__(self, offset: np.float32, absmax2: np.ndarray, n_blocks: int) -> None:
        self.offset = np.float32(offset)
        self.absmax2 = np.ascontiguousarray(absmax2, dtype=np.float32)
        self.n_blocks = int(n_blocks)

    def check(self, raw: np.ndarray, row_length: int) -> None:
        if raw.shape[0] * (row_length // QK) != self.n_blocks:
            raise QConvertError(
                f"NF4_DQ params describe {self.n_blocks} blocks, the packed matrix has "
                f"{raw.shape[0] * (row_length // QK)}"
            )


def prepare_dq(params: dict, shape: tuple[int, ...]) -> DQAux:
    """Tensor params -> the kernels' aux (validated once, when a Linear/Embedding is built)."""
    n_blocks = int(np.prod(shape, dtype=np.int64)) // QK
    offset, absmax2 = dq_state(params, n_blocks)
    return DQAux(offset, absmax2, n_blocks)


def matvec_dq(raw: np.ndarray, x: np.ndarray, aux: DQAux) -> np.ndarray:
    aux.check(raw, x.shape[0])
    out = np.empty(raw.shape[0], np.float32)
    _matvec(raw, x, _DYN, aux.absmax2, aux.offset, out, 1)
    return out


def matmul_dq(raw: np.ndarray, X: np.ndarray, aux: DQAux) -> np.ndarray:
    T, n_in = X.shape
    if T < SMALL_T:
        return np.stack([matvec_dq(raw, X[t], aux) for t in range(T)])
    aux.check(raw, n_in)
    out = np.empty((T, raw.shape[0]), np.float32)
    _matmul(raw, gemm_operand(X, k_padded(n_in)), T, n_in, _DYN, aux.absmax2, aux.offset, out, 1)
    return out


def dequant_rows_dq(raw: np.ndarray, ids: np.ndarray, row_length: int, out=None, aux: DQAux | None = None) -> np.ndarray:
    if aux is None:
        raise QConvertError("NF4_DQ rows decode only with the tensor's params (aux)")
    aux.check(raw, row_length)
    if out is None:
        out = np.empty((ids.shape[0], row_length), np.float32)
    _dequant_rows(raw, ids, out, _DYN, aux.absmax2, aux.offset, 1)
    return out


# --- plain-numpy references (tests and debugging; from the layouts above) -------------------------


def reference_dequantize(raw: np.ndarray, name: str, row_length: int, params: dict | None = None) -> np.ndarray:
    """Packed (rows, row_bytes) -> float32 (rows, row_length)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows, nb = raw.shape[0], row_length // QK
    if name == "NF4":
        blocks = raw.reshape(rows * nb, NF4_SIZE)
        scale = blocks[:, 0:4].copy().view("<f4").reshape(-1)
        qs = blocks[:, 4:]
    elif name == "NF4_DQ":
        blocks = raw.reshape(rows * nb, DQ_SIZE)
        offset, absmax2 = dq_state(params, rows * nb)
        g = np.arange(rows * nb) // DQ_BLOCK
        scale = (_DYN[blocks[:, 0]] * absmax2[g]).astype(np.float32) + offset
        qs = blocks[:, 1:]
    else:
        raise ValueError(name)
    q = np.stack([qs >> 4, qs & 15], axis=-1).reshape(rows * nb, QK)
    return (_T[q] * scale[:, None]).astype(np.float32).reshape(rows, row_length)


def reference_matvec(raw, name, x, params=None) -> np.ndarray:
    """float64 W_dequant @ x (x (in,) or (T, in) -> (out,) or (T, out))."""
    x = np.asarray(x, dtype=np.float64)
    W = reference_dequantize(raw, name, x.shape[-1], params).astype(np.float64)
    return x @ W.T


def reference_error_scale(raw, name, x, params=None) -> np.ndarray:
    """sum_j |w_ij| |x_j| per output: the magnitude a float32 rounding error is relative to."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return x @ np.abs(reference_dequantize(raw, name, x.shape[-1], params).astype(np.float64)).T


register_kernel("NF4", matvec_nf4, matmul_nf4, dequant_rows=dequant_rows_nf4, block_size=QK, type_size=NF4_SIZE)
register_kernel(
    "NF4_DQ",
    matvec_dq,
    matmul_dq,
    dequant_rows=dequant_rows_dq,
    block_size=QK,
    type_size=DQ_SIZE,
    prepare=prepare_dq,
)
