"""GGML's 4-bit non-linear i-quants: IQ4_NL (32-element blocks) and IQ4_XS (256-element
super-blocks of eight 32-element sub-blocks).

Both store 4-bit indices into llama.cpp's fixed non-uniform table ``kvalues_iq4nl``
(-127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113), two per byte: byte j of a
32-element group holds element j in its low nibble and element j+16 in its high nibble.

- IQ4_NL (ggml type 20), 18 bytes: d f16, qs u8[16]; x = d * kvalues[q].
- IQ4_XS (ggml type 23), 136 bytes: d f16, scales_h u16 (2 high bits of each of the eight
  6-bit sub-block scales, sub-block ib at bits 2*ib), scales_l u8[4] (4 low bits, sub-block
  ib in byte ib/2, nibble ib%2), qs u8[128]; x = d * (ls - 32) * kvalues[q].

Quantization is byte-identical with llama.cpp's ``quantize_iq4_nl`` / ``quantize_iq4_xs``
(what ``ggml_quantize_chunk`` and ``llama-quantize`` run, with or without an imatrix). Both
run ``quantize_row_iq4_nl_impl`` with ntry = 7, which this module follows in float32, one
rounding per operation, in C's order (no FMA):

- sigma2 = sum(x*x) over the (super-)block * (2/super_block_size); the weights of a 32-group
  are imp*sqrt(sigma2 + x*x) with an importance vector, else x*x.
- per group: max = the first x with the largest |x|; amax < 1e-15 -> scale 0. Otherwise
  d = -max/-127, L = best_index(x/d) (nearest table value; a tie goes to the upper value
  only when strictly nearer, see :func:`_best_index`), d = sumqx/sumq2 (sumqx = sum(w*q*x),
  sumq2 = sum(w*q*q)), best = d*sumqx; then for itry in -7..7, id = (itry - 127)/max, same
  sums, taken when sumq2 > 0 and sumqx^2 > best*sumq2.
- IQ4_NL: d stored as f16(scale); L = best_index(x * (1/scale)) with the unrounded float
  scale (all L = 8, the index of the table's 1, when scale is 0).
- IQ4_XS: max_scale = the first group scale with the largest |.|; d = -max_scale/32 (f16
  stored, float kept); l = clamp(nearest_int(scale/d), -32, 31) (id = 0 when d is 0),
  dl = d*l (float d), L = best_index(x * (1/dl)) (0 when dl is 0); stored ls = l + 32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import QConvertError
from .kquants import _EPS, _F0, _F1, _F16, _f16_bits, _nearest_int
from .registry import BlockType, register

QK4_NL = 32
QK_K = 256
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES_IQ4NL.astype(np.float32)
_NTRY = 7
_F32 = np.float32(32.0)
_NO_WEIGHTS = np.zeros(1, np.float32)


@njit(inline="always")
def _best_index(kv, x):
    """llama.cpp's best_index_int8(16, kvalues, x): binary search, then the lower neighbour
    unless the upper one is strictly nearer (float32 differences)."""
    if x <= kv[0]:
        return 0
    if x >= kv[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < kv[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - kv[mu - 1] < kv[mu] - x else mu


@njit(inline="always")
def _group_scale(kv, xb, w, n):
    """The ntry=7 search for one 32-element group -> its float scale."""
    amax = _F0
    mx = _F0
    for j in range(n):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < _EPS:
        return _F0
    d = -mx / kv[0]
    idv = _F1 / d
    sumqx = _F0
    sumq2 = _F0
    for j in range(n):
        q = kv[_best_index(kv, idv * xb[j])]
        sumqx += w[j] * q * xb[j]
        sumq2 += w[j] * q * q
    d = sumqx / sumq2 if sumq2 > _F0 else _F0
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        idv = np.float32(itry - 127) / mx
        sumqx = _F0
        sumq2 = _F0
        for j in range(n):
            q = kv[_best_index(kv, idv * xb[j])]
            sumqx += w[j] * q * xb[j]
            sumq2 += w[j] * q * q
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(inline="always")
def _weights(xb, qwb, use_qw, sigma2, w):
    for j in range(32):
        if use_qw:
            w[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            w[j] = xb[j] * xb[j]


@njit(parallel=True, cache=True, error_model="numpy")
def _kernel_iq4_nl(x, qw, use_qw, per_row, out):
    kv = _KV.copy()
    for b in prange(x.shape[0]):
        xb = x[b]
        w = np.empty(32, np.float32)
        qwb = qw[(b % per_row) * 32 : (b % per_row) * 32 + 32] if use_qw else qw
        sigma2 = _F0
        for j in range(32):
            sigma2 += xb[j] * xb[j]
        sigma2 *= np.float32(2.0 / 32)
        _weights(xb, qwb, use_qw, sigma2, w)
        s = _group_scale(kv, xb, w, 32)
        h = _f16_bits(s)
        out[b, 0] = np.uint8(h & 0xFF)
        out[b, 1] = np.uint8(h >> 8)
        idv = _F1 / s if s != _F0 else _F0
        for j in range(16):
            lo = _best_index(kv, idv * xb[j])
            hi = _best_index(kv, idv * xb[j + 16])
            out[b, 2 + j] = np.uint8(lo | (hi << 4))


@njit(parallel=True, cache=True, error_model="numpy")
def _kernel_iq4_xs(x, qw, use_qw, per_row, out):
    kv = _KV.copy()
    for b in prange(x.shape[0]):
        xs = x[b]
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        off = (b % per_row) * QK_K
        sigma2 = _F0
        for j in range(QK_K):
            sigma2 += xs[j] * xs[j]
        sigma2 *= np.float32(2.0 / QK_K)
        max_scale = _F0
        amax_scale = _F0
        for ib in range(8):
            xb = xs[32 * ib : 32 * ib + 32]
            qwb = qw[off + 32 * ib : off + 32 * ib + 32] if use_qw else qw
            _weights(xb, qwb, use_qw, sigma2, w)
            s = _group_scale(kv, xb, w, 32)
            scales[ib] = s
            if abs(s) > amax_scale:
                amax_scale = abs(s)
                max_scale = s
        d = -max_scale / _F32
        h = _f16_bits(d)
        out[b, 0] = np.uint8(h & 0xFF)
        out[b, 1] = np.uint8(h >> 8)
        idv = _F1 / d if d != _F0 else _F0
        sh = 0
        for ib in range(8):
            l = _nearest_int(idv * scales[ib])
            l = max(-32, min(31, l))
            dl = d * np.float32(l)
            idl = _F1 / dl if dl != _F0 else _F0
            for j in range(16):
                lo = _best_index(kv, idl * xs[32 * ib + j])
                hi = _best_index(kv, idl * xs[32 * ib + 16 + j])
                out[b, 8 + 16 * ib + j] = np.uint8(lo | (hi << 4))
            l += 32
            if ib % 2 == 0:
                out[b, 4 + ib // 2] = np.uint8(l & 0xF)
            else:
                out[b, 4 + ib // 2] |= np.uint8((l & 0xF) << 4)
            sh |= (l >> 4) << (2 * ib)
        out[b, 2] = np.uint8(sh & 0xFF)
        out[b, 3] = np.uint8(sh >> 8)


def _check_importance(importance: np.ndarray | None, n: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if imp.size != n:
        raise QConvertError(f"importance vector has {imp.size} values, the rows have {n}")
    if not np.all(np.isfinite(imp)):
        raise QConvertError("importance vector holds non-finite values")
    return imp


def quantize_iq4(type_id: int, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(n_rows, n) float32 -> (n_rows, row_bytes) uint8 for IQ4_NL (20) or IQ4_XS (23);
    ``importance``: one weight per column, or None (llama.cpp's quantize_iq4_nl/_xs)."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[None, :]
    n_rows, n = rows.shape
    bs, ts = (QK4_NL, 18) if type_id == 20 else (QK_K, 136)
    if n % bs:
        raise QConvertError(f"{'IQ4_NL' if type_id == 20 else 'IQ4_XS'} needs rows that are a multiple of {bs} elements, got {n}")
    imp = _check_importance(importance, n)
    x = np.ascontiguousarray(rows).reshape(-1, bs)
    out = np.zeros((x.shape[0], ts), np.uint8)
    if x.shape[0]:
        qw, use = (_NO_WEIGHTS, False) if imp is None else (imp, True)
        kernel = _kernel_iq4_nl if type_id == 20 else _kernel_iq4_xs
        kernel(x, qw, use, n // bs, out)
    return out.reshape(n_rows, n // bs * ts)


# ---------------------------------------------------------------------------------------
# dequantization (numpy; the same float32 operations as ggml and gguf-py)


def _f16_col(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(_F16).astype(np.float32)


def _unpack_groups(qs: np.ndarray) -> np.ndarray:
    """(n, 16*g) packed nibbles -> (n, 32*g) table values (float32)."""
    n = qs.shape[0]
    g = qs.reshape(n, -1, 16)
    idx = np.concatenate([g & 0xF, g >> 4], axis=2).reshape(n, -1)
    return _KV[idx]


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty((blocks.shape[0], QK4_NL), np.float32)
    for s in range(0, blocks.shape[0], 16384):
        b = blocks[s : s + 16384]
        out[s : s + 16384] = _f16_col(b, 0) * _unpack_groups(b[:, 2:])
    return out


def xs_scales(blocks: np.ndarray) -> np.ndarray:
    """(n, 136) IQ4_XS blocks -> (n, 8) int sub-block scales ls - 32."""
    sh = blocks[:, 2].astype(np.int32) | (blocks[:, 3].astype(np.int32) << 8)
    ib = np.arange(8)
    lo = (blocks[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF
    hi = (sh[:, None] >> (2 * ib)) & 3
    return (lo.astype(np.int32) | (hi << 4)) - 32


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty((blocks.shape[0], QK_K), np.float32)
    for s in range(0, blocks.shape[0], 4096):
        b = blocks[s : s + 4096]
        dl = _f16_col(b, 0) * xs_scales(b).astype(np.float32)  # (n, 8)
        vals = _unpack_groups(b[:, 8:]).reshape(-1, 8, 32)
        out[s : s + 4096] = (dl[:, :, None] * vals).reshape(-1, QK_K)
    return out


def _quantizers(type_id: int, bs: int):
    def quantize_blocks(blocks: np.ndarray) -> np.ndarray:
        return quantize_iq4(type_id, np.asarray(blocks, np.float32).reshape(-1, bs))

    def quantize_rows(rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        return quantize_iq4(type_id, rows, importance)

    return quantize_blocks, quantize_rows


_qb, _qr = _quantizers(20, QK4_NL)
IQ4_NL = register(
    BlockType(
        id=20,
        name="IQ4_NL",
        block_size=QK4_NL,
        type_size=18,
        quantize_blocks=_qb,
        dequantize_blocks=dequantize_iq4_nl,
        description="x = d*kvalues[q]; d: f16, qs u8[16] (4-bit indices into the non-linear table kvalues_iq4nl)",
        quantize_rows=_qr,
    )
)
_qb, _qr = _quantizers(23, QK_K)
IQ4_XS = register(
    BlockType(
        id=23,
        name="IQ4_XS",
        block_size=QK_K,
        type_size=136,
        quantize_blocks=_qb,
        dequantize_blocks=dequantize_iq4_xs,
        description=(
            "x = d*(ls-32)*kvalues[q]; d: f16, scales_h u16, scales_l u8[4] (8 x 6-bit ls), "
            "qs u8[128] (4-bit indices into kvalues_iq4nl)"
        ),
        quantize_rows=_qr,
    )
)
