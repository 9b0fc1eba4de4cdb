"""LLVM IR building blocks for the numba kernels.

Why IR and not plain numba loops: a 32-element block has a constant trip count, so LLVM
fully unrolls the per-block loop and then vectorises the *block* loop with strided gathers
(measured: 5-10x slower than the explicit version below). Emitting the vector code by hand
through ``numba.extending.intrinsic`` keeps one block = a few SIMD instructions on every
target LLVM knows (AVX2, AVX-512, NEON); LLVM splits or widens the generic vectors itself.

Conventions
- Pointers are ``i8*`` plus byte offsets; every load of packed bytes uses ``align 1``.
- ``FAST`` flags are used only on the dot-product arithmetic (reassociation, contraction); the
  dequantisation path uses none, so it reproduces numpy's float32 ``d * q + m`` bit for bit.
  Neither uses ``nnan``/``ninf``: an inf or NaN scale propagates as IEEE says.
- Caching: numba's on-disk cache is keyed on the file that defines the ``@njit`` function,
  not on this file. After editing this module, delete ``__pycache__/*.nbi``/``*.nbc`` next to
  the kernel modules (or touch them), or numba may keep running the old machine code.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
HALF = ir.HalfType()
I8P = I8.as_pointer()

FAST = ("reassoc", "contract", "nsz", "arcp")


def vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def const(ty: ir.Type, value) -> ir.Constant:
    """A constant; for a vector type, a scalar value is splatted."""
    if isinstance(ty, ir.VectorType) and not isinstance(value, (list, tuple)):
        value = [value] * ty.count
    return ir.Constant(ty, value)


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def splat(builder: ir.IRBuilder, scalar: ir.Value, n: int) -> ir.Value:
    vty = vec(scalar.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def lanes(builder: ir.IRBuilder, v: ir.Value, start: int, n: int) -> ir.Value:
    """Elements start..start+n-1 of a vector."""
    return builder.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(start, start + n))))


def concat(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(vec(I32, 2 * n), list(range(2 * n))))


def hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Horizontal float sum of a vector (pairwise halving)."""
    n = v.type.count
    while n > 1:
        h = n // 2
        v = builder.fadd(lanes(builder, v, 0, h), lanes(builder, v, h, h), flags=FAST)
        n = h
    return builder.extract_element(v, ir.Constant(I32, 0))


def gep(builder: ir.IRBuilder, ptr: ir.Value, offset) -> ir.Value:
    """``ptr + offset`` bytes (ptr is i8*; offset an i64 value or a Python int)."""
    if isinstance(offset, int):
        if offset == 0:
            return ptr
        offset = i64(offset)
    return builder.gep(ptr, [offset])


def load(builder: ir.IRBuilder, ptr: ir.Value, offset, ty: ir.Type, align: int = 1) -> ir.Value:
    p = builder.bitcast(gep(builder, ptr, offset), ty.as_pointer())
    return builder.load(p, align=align)


def store(builder: ir.IRBuilder, value: ir.Value, ptr: ir.Value, offset, align: int = 4) -> None:
    p = builder.bitcast(gep(builder, ptr, offset), value.type.as_pointer())
    builder.store(value, p, align=align)


# ---------------------------------------------------------------------------------------
# half -> float


def f16_bits_to_f32(builder: ir.IRBuilder, h: ir.Value) -> ir.Value:
    """IEEE binary16 bits (i16 or <n x i16>) -> float, exact, by integer arithmetic.

    normal:    exponent rebias (+112) and mantissa shift;
    subnormal: m * 2**-24 (exact in float32, and a normal float32, so FTZ/DAZ cannot bite);
    inf/NaN:   exponent 255, mantissa kept (NaN stays NaN, payload kept);
    sign:      copied (so -0.0 stays -0.0).
    """
    is_vec = isinstance(h.type, ir.VectorType)
    it = vec(I32, h.type.count) if is_vec else I32
    ft = vec(F32, h.type.count) if is_vec else F32
    w = builder.zext(h, it)
    sign = builder.shl(builder.and_(w, const(it, 0x8000)), const(it, 16))
    em = builder.and_(w, const(it, 0x7FFF))
    is_sub = builder.icmp_unsigned("<", em, const(it, 0x0400))
    is_special = builder.icmp_unsigned(">=", em, const(it, 0x7C00))
    bias = builder.select(is_special, const(it, 0x70000000), const(it, 0x38000000))
    normal = builder.add(builder.shl(em, const(it, 13)), bias)
    sub = builder.bitcast(builder.fmul(builder.uitofp(em, ft), const(ft, 2.0**-24)), it)
    bits = builder.or_(builder.select(is_sub, sub, normal), sign)
    return builder.bitcast(bits, ft)


def _native_half() -> bool:
    """Whether the numba target converts half->float in hardware (x86 F16C, any AArch64).

    Without it LLVM would lower ``fpext half`` to a runtime-library call that the JIT may not
    resolve, so the bit-manipulation version is used instead (same results)."""
    try:
        from numba.core import config
        import llvmlite.binding as llvm

        if config.CPU_NAME:  # an explicit (e.g. generic, for portable caches) target
            feats = config.CPU_FEATURES or ""
            return "+f16c" in feats
        triple = llvm.get_process_triple()
        if triple.startswith(("aarch64", "arm64")):
            return True
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - be conservative
        return False


NATIVE_HALF = _native_half()


def f16_to_f32(builder: ir.IRBuilder, h: ir.Value) -> ir.Value:
    """i16 bits (scalar or vector) -> float; hardware conversion where available."""
    if not NATIVE_HALF:
        return f16_bits_to_f32(builder, h)
    if isinstance(h.type, ir.VectorType):
        ht, ft = vec(HALF, h.type.count), vec(F32, h.type.count)
    else:
        ht, ft = HALF, F32
    return builder.fpext(builder.bitcast(h, ht), ft)


def bf16_to_f32(builder: ir.IRBuilder, h: ir.Value) -> ir.Value:
    """bfloat16 bits (i16 or vector) -> float: the top half of a float32, exact."""
    is_vec = isinstance(h.type, ir.VectorType)
    it = vec(I32, h.type.count) if is_vec else I32
    ft = vec(F32, h.type.count) if is_vec else F32
    return builder.bitcast(builder.shl(builder.zext(h, it), const(it, 16)), ft)


# ---------------------------------------------------------------------------------------
# control flow


def for_range(
    builder: ir.IRBuilder,
    start: ir.Value,
    stop: ir.Value,
    inits: Sequence[ir.Value],
    body: Callable[[ir.IRBuilder, ir.Value, list], Sequence[ir.Value]],
) -> list:
    """Emit ``for i in range(start, stop): vals = body(i, vals)`` and return the final vals.

    ``body`` may create blocks of its own; the loop closes over wherever it leaves the
    builder. The values are loop-carried through phi nodes.
    """
    pre = builder.block
    loop = builder.append_basic_block("loop")
    after = builder.append_basic_block("loop.after")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, after)

    builder.position_at_end(loop)
    i = builder.phi(start.type)
    carried = [builder.phi(v.type) for v in inits]
    new = list(body(builder, i, list(carried)))
    i_next = builder.add(i, ir.Constant(start.type, 1))
    end = builder.block
    i.add_incoming(start, pre)
    i.add_incoming(i_next, end)
    for ph, init, nv in zip(carried, inits, new):
        ph.add_incoming(init, pre)
        ph.add_incoming(nv, end)
    builder.cbranch(builder.icmp_signed("<", i_next, stop), loop, after)

    builder.position_at_end(after)
    finals = []
    for init, nv in zip(inits, new):
        ph = builder.phi(init.type)
        ph.add_incoming(init, pre)
        ph.add_incoming(nv, end)
        finals.append(ph)
    return finals


def switch(builder: ir.IRBuilder, kind: ir.Value, cases: dict, result_type: ir.Type | None, default=None):
    """``switch kind`` over Python-generated case bodies.

    ``cases``: {int: fn(builder) -> value or None}. Returns the phi of the results (or None).
    ``default``: value returned for an unknown kind (the Python side validates kinds first).
    """
    merge = builder.append_basic_block("switch.merge")
    dflt = builder.append_basic_block("switch.default")
    sw = builder.switch(kind, dflt)
    incoming = []
    for key, fn in cases.items():
        bb = builder.append_basic_block(f"case.{key}")
        sw.add_case(ir.Constant(kind.type, key), bb)
        builder.position_at_end(bb)
        val = fn(builder)
        incoming.append((val, builder.block))
        builder.branch(merge)
    builder.position_at_end(dflt)
    if result_type is not None:
        incoming.append((default, builder.block))
    builder.branch(merge)
    builder.position_at_end(merge)
    if result_type is None:
        return None
    ph = builder.phi(result_type)
    for val, bb in incoming:
        ph.add_incoming(val, bb)
    return ph


# ---------------------------------------------------------------------------------------
# numba arrays


class ArrayView:
    """The raw pieces of a numba array argument inside an intrinsic."""

    def __init__(self, context, builder, aryty, value):
        ary = context.make_array(aryty)(context, builder, value)
        self.data = builder.bitcast(ary.data, I8P)
        self.shape = cgutils.unpack_tuple(builder, ary.shape)
        self.strides = cgutils.unpack_tuple(builder, ary.strides)

    def row(self, builder, r: ir.Value) -> ir.Value:
        """i8* to row ``r`` of a 2-D array."""
        return gep(builder, self.data, builder.mul(r, self.strides[0]))


def rotate(accs: list, new) -> list:
    """Round-robin accumulators: the oldest one receives ``new``'s value next.

    Using k accumulators in turn splits the loop-carried FMA dependency k ways (the core's
    out-of-order engine then overlaps consecutive blocks)."""
    return accs[1:] + [new]


# ---------------------------------------------------------------------------------------
# float32 GEMM micro-kernel: out[t, r0 + i] = dot(buf[i, :], X[t, :])


def _host_has(feature: str) -> bool:
    try:
        from numba.core import config
        import llvmlite.binding as llvm

        if config.CPU_NAME:
            return f"+{feature}" in (config.CPU_FEATURES or "")
        return bool(llvm.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover
        return False


#: GEMM register tile: GEMM_MR weight rows x GEMM_NR tokens, vectors of GEMM_LANES floats.
#: AVX-512 has 32 vector registers (16 accumulators + 8 operands fit); elsewhere assume 16.
if _host_has("avx512f"):
    GEMM_LANES, GEMM_MR, GEMM_NR = 16, 4, 4
else:
    GEMM_LANES, GEMM_MR, GEMM_NR = 8, 4, 2


def _transpose_sums(builder, accs: list) -> list:
    """Horizontal sums of n vectors of n lanes at once: fold pairs of vectors with two
    shuffles and an add (lane groups of the same owner halve each round) until every lane of
    one vector holds one accumulator's total. Returns [(vector, owner index per lane)]."""
    n = accs[0].type.count
    assert len(accs) == n, "the GEMM tile must have as many accumulators as lanes"
    items = [(a, [k] * n) for k, a in enumerate(accs)]
    width = n  # lanes per owner group
    while len(items) > 1:
        half = width // 2
        lo_idx = [g + i for g in range(0, n, width) for i in range(half)]
        hi_idx = [g + half + i for g in range(0, n, width) for i in range(half)]
        # result lane layout: a's half-group, b's half-group, a's next, b's next, ...
        lo_mask, hi_mask = [], []
        for g in range(0, len(lo_idx), half):
            lo_mask += lo_idx[g : g + half] + [n + i for i in lo_idx[g : g + half]]
            hi_mask += hi_idx[g : g + half] + [n + i for i in hi_idx[g : g + half]]
        nxt = []
        for p in range(0, len(items), 2):
            (a, oa), (b, ob) = items[p], items[p + 1]
            lo = builder.shuffle_vector(a, b, ir.Constant(vec(I32, n), lo_mask))
            hi = builder.shuffle_vector(a, b, ir.Constant(vec(I32, n), hi_mask))
            both = oa + ob
            nxt.append((builder.fadd(lo, hi, flags=FAST), [both[i] for i in lo_mask]))
        items = nxt
        width = half
    return items


def emit_gemm_rows(context, builder, sig, args, L=None, MR=None, NR=None):
    """Codegen of ``gemm_rows(buf, nr, X, t_valid, out, r0)``:
    out[t, r0 + i] = dot(buf[i, :], X[t, :]) for i < nr, t < t_valid.

    buf (rows >= nr rounded up to MR, k) and X (tokens rounded up to NR, k) are float32 C
    arrays with the same k, a multiple of L, zero-padded. Register tile: MR rows x NR tokens
    of L-lane accumulators (MR * NR == L), k swept in L-float steps, then one transposing
    reduction per tile."""
    L = L or GEMM_LANES
    MR = MR or GEMM_MR
    NR = NR or GEMM_NR
    bufv = ArrayView(context, builder, sig.args[0], args[0])
    xv = ArrayView(context, builder, sig.args[2], args[2])
    outv = ArrayView(context, builder, sig.args[4], args[4])
    nr = context.cast(builder, args[1], sig.args[1], types.int64)
    t_valid = context.cast(builder, args[3], sig.args[3], types.int64)
    r0 = context.cast(builder, args[5], sig.args[5], types.int64)
    VT = vec(F32, L)
    k_pad = bufv.shape[1]
    kv = builder.sdiv(k_pad, i64(L))
    row_bytes = builder.mul(k_pad, i64(4))
    n_ttiles = builder.sdiv(builder.add(t_valid, i64(NR - 1)), i64(NR))
    n_rtiles = builder.sdiv(builder.add(nr, i64(MR - 1)), i64(MR))
    zero = const(VT, 0.0)

    def token_tile(b, tt, _vals):
        t0 = b.mul(tt, i64(NR))
        xrows = [gep(b, xv.data, b.mul(b.add(t0, i64(j)), row_bytes)) for j in range(NR)]

        def row_tile(b, rt, _vals):
            i0 = b.mul(rt, i64(MR))
            wrows = [gep(b, bufv.data, b.mul(b.add(i0, i64(i)), row_bytes)) for i in range(MR)]

            def kstep(b, k, accs):
                off = b.mul(k, i64(L * 4))
                ws = [load(b, w, off, VT, align=4) for w in wrows]
                xs = [load(b, x, off, VT, align=4) for x in xrows]
                return [
                    b.fadd(b.fmul(ws[i], xs[j], flags=FAST), accs[i * NR + j], flags=FAST)
                    for i in range(MR)
                    for j in range(NR)
                ]

            accs = for_range(b, i64(0), kv, [zero] * (MR * NR), kstep)
            for vecv, owners in _transpose_sums(b, accs):
                for lane, owner in enumerate(owners):
                    i, j = divmod(owner, NR)
                    row = b.add(i0, i64(i))
                    tok = b.add(t0, i64(j))
                    ok = b.and_(b.icmp_signed("<", row, nr), b.icmp_signed("<", tok, t_valid))
                    with b.if_then(ok):
                        val = b.extract_element(vecv, ir.Constant(I32, lane))
                        dst = gep(b, outv.row(b, tok), b.mul(b.add(r0, row), i64(4)))
                        b.store(val, b.bitcast(dst, F32.as_pointer()), align=4)
            return []

        for_range(b, i64(0), n_rtiles, [], row_tile)
        return []

    for_range(builder, i64(0), n_ttiles, [], token_tile)
    return context.get_dummy_value()


def make_gemm_rows(lanes: int, mr: int, nr_tokens: int):
    """A ``gemm_rows`` intrinsic with the given register tile (tests build the non-AVX-512
    shapes with this on any host)."""
    if mr * nr_tokens != lanes:
        raise ValueError("the register tile needs rows x tokens == lanes")

    def codegen(context, builder, sig, args):
        return emit_gemm_rows(context, builder, sig, args, lanes, mr, nr_tokens)

    @intrinsic
    def gemm_rows(typingctx, buf, nr, X, t_valid, out, r0):
        """out[t, r0 + i] = dot(buf[i], X[t]) for i < nr, t < t_valid (see emit_gemm_rows)."""
        return types.void(buf, nr, X, t_valid, out, r0), codegen

    return gemm_rows


gemm_rows = make_gemm_rows(GEMM_LANES, GEMM_MR, GEMM_NR)


#: weight rows dequantised per work item of a batched product (a float32 tile in L1/L2)
GEMM_ROWS = 16


def gemm_operand(X: np.ndarray, k_pad: int) -> np.ndarray:
    """X (T, k) float32 -> C array (T rounded up to GEMM_NR, k_pad), zero-padded (no copy
    when nothing needs padding)."""
    T, k = X.shape
    t_pad = -(-T // GEMM_NR) * GEMM_NR
    if t_pad == T and k_pad == k and X.dtype == np.float32 and X.flags.c_contiguous:
        return X
    Xp = np.zeros((t_pad, k_pad), np.float32)
    Xp[:T, :k] = X
    return Xp


def k_padded(k: int) -> int:
    return -(-k // GEMM_LANES) * GEMM_LANES


@njit(cache=True, parallel=True)
def _gemm_f32(W, Xp, t_valid, out):
    n_out, k = W.shape
    k_pad = Xp.shape[1]
    G = GEMM_ROWS
    for g in prange((n_out + G - 1) // G):
        r0 = g * G
        nr = min(G, n_out - r0)
        buf = np.zeros((G, k_pad), np.float32)
        for i in range(nr):
            for j in range(k):
                buf[i, j] = W[r0 + i, j]
        gemm_rows(buf, nr, Xp, t_valid, out, r0)


def gemm_f32(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """(T, k) x float32 (n, k) -> (T, n) with the IR micro-kernel (no BLAS threads)."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    Xp = gemm_operand(np.ascontiguousarray(X, dtype=np.float32), k_padded(W.shape[1]))
    out = np.empty((X.shape[0], W.shape[0]), np.float32)
    _gemm_f32(W, Xp, X.shape[0], out)
    return out


# ---------------------------------------------------------------------------------------
# half -> float for numba code and for the exhaustive test


@intrinsic
def half_to_float(typingctx, h):
    """numba-callable: IEEE half bits (any integer type) -> float32, exactly as the kernels
    decode scales (hardware conversion where available, else bit arithmetic)."""
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        bits = context.cast(builder, args[0], signature.args[0], types.uint16)
        return f16_to_f32(builder, bits)

    return sig, codegen


@intrinsic
def _f16_convert(typingctx, h, out, mode):
    """out[:] = float(h[:]); mode 0/1: scalar hardware/bit-arithmetic path, 2/3: the
    16-lane vector versions (what the F16 kernels use), plus a scalar tail."""
    sig = types.void(h, out, mode)

    def codegen(context, builder, signature, args):
        hv = ArrayView(context, builder, signature.args[0], args[0])
        ov = ArrayView(context, builder, signature.args[1], args[1])
        mode_v = context.cast(builder, args[2], signature.args[2], types.int64)
        n = hv.shape[0]

        def case(vector: bool, native: bool):
            conv = f16_to_f32 if native else f16_bits_to_f32

            def emit(b):
                start = i64(0)
                if vector:
                    nv = b.sdiv(n, i64(16))

                    def vbody(bb, i, vals):
                        v = conv(bb, load(bb, hv.data, bb.mul(i, i64(32)), vec(I16, 16), align=2))
                        store(bb, v, ov.data, bb.mul(i, i64(64)))
                        return []

                    for_range(b, i64(0), nv, [], vbody)
                    start = b.mul(nv, i64(16))

                def sbody(bb, i, vals):
                    v = conv(bb, load(bb, hv.data, bb.mul(i, i64(2)), I16, align=2))
                    store(bb, v, ov.data, bb.mul(i, i64(4)))
                    return []

                for_range(b, start, n, [], sbody)
                return None

            return emit

        cases = {0: case(False, True), 1: case(False, False), 2: case(True, True), 3: case(True, False)}
        switch(builder, mode_v, cases, None)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _f16_array(h, out, mode):
    _f16_convert(h, out, mode)


def f16_array_to_f32(bits: np.ndarray, mode: int = 2) -> np.ndarray:
    """Convert uint16 half bit patterns with one of the kernels' code paths (see _f16_convert)."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    out = np.empty(bits.shape[0], np.float32)
    _f16_array(bits, out, int(mode))
    return out
