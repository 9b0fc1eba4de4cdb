"""Plain-numpy references for the K-quant kernels (tests, benchmarks, debugging; slow).

Written element by element from the layouts in ANCHORS.md §B2, independently of gguf-py, of
the codecs in :mod:`qconvert.blocks` and of the numba kernels, so each can be checked
against the others. Every K-quant element is

    w = dl * q - ml        dl = d * sc (per sub-block), ml = dmin * m (0 for Q3_K, Q6_K)

with d, dmin IEEE halves and sc, m, q small integers. ``d * sc`` and ``dl * q`` are exact in
float32 (at most 11 + 8 + 6 significant bits), so the only rounding of the dequantised value
is the final subtraction, done in numpy float32 as gguf-py does (``dl * q - ml``).

Not a kernel family: the package loader imports it (its name does not start with ``_``),
which only defines functions.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_F16 = np.dtype("<f2")

#: name -> bytes per 256-element super-block
TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
TYPES = tuple(TYPE_SIZE)
#: name -> elements per sub-block (one scale, and one min where the type has mins)
SUB_BLOCK = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}
HAS_MIN = {"Q2_K": True, "Q3_K": False, "Q4_K": True, "Q5_K": True, "Q6_K": False}
#: name -> byte offsets of d and dmin (None: no dmin)
HALF_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None)}

_E = np.arange(QK_K)  # element index inside a super-block


def _half(blocks: np.ndarray, off: int) -> np.ndarray:
    """f16 at byte ``off`` of every block -> float32 (rows, nb, 1)."""
    return blocks[..., off : off + 2].copy().view(_F16).astype(np.float32)


def _bits(blocks: np.ndarray, byte_idx: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(blocks[..., byte_idx[e]] >> shift[e]) & mask for every element e, as int32."""
    return (blocks[..., byte_idx].astype(np.int32) >> shift) & mask


def _scale_min_k4(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: 6-bit scales and mins, int32 (..., 8)."""
    b = sc12.astype(np.int32)
    sc = np.empty(b.shape[:-1] + (8,), np.int32)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j] = b[..., j] & 63
            mn[..., j] = b[..., j + 4] & 63
        else:
            sc[..., j] = (b[..., j + 4] & 0xF) | ((b[..., j - 4] >> 6) << 4)
            mn[..., j] = (b[..., j + 4] >> 4) | ((b[..., j] >> 6) << 4)
    return sc, mn


def parts(raw: np.ndarray, name: str, row_length: int):
    """Packed (rows, row_bytes) -> (dl, q, ml), each (rows, row_length) per element:
    dl float32 (d * sub-block scale), q int32 (the quant, centred for Q3_K/Q6_K),
    ml float32 (dmin * sub-block min; zeros for the types without mins)."""
    size = TYPE_SIZE[name]
    raw = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8))
    rows = raw.shape[0]
    nb = row_length // QK_K
    blocks = raw.reshape(rows, nb, size)
    d = _half(blocks, HALF_OFFSETS[name][0])
    sub = _E // SUB_BLOCK[name]  # sub-block of each element
    ml = None
    if name == "Q2_K":
        sc = blocks[..., 0:16].astype(np.int32)
        dl = d * (sc & 15).astype(np.float32)
        ml = _half(blocks, 82) * (sc >> 4).astype(np.float32)
        # per 128-half h, byte qs[32h + l] holds elements l, l+32, l+64, l+96 at bits 0,2,4,6
        q = _bits(blocks, 16 + 32 * (_E // 128) + _E % 32, 2 * ((_E % 128) // 32), 3)
    elif name == "Q3_K":
        s = blocks[..., 96:108].astype(np.int32)
        sc = np.empty((rows, nb, 16), np.int32)
        for j in range(16):
            low = s[..., j] & 15 if j < 8 else s[..., j - 8] >> 4
            high = (s[..., 8 + j % 4] >> (2 * (j // 4))) & 3
            sc[..., j] = (low | (high << 4)) - 32
        dl = d * sc.astype(np.float32)
        low2 = _bits(blocks, 32 + 32 * (_E // 128) + _E % 32, 2 * ((_E % 128) // 32), 3)
        hbit = _bits(blocks, _E % 32, _E // 32, 1)
        q = low2 - np.where(hbit == 1, 0, 4)
    elif name in ("Q4_K", "Q5_K"):
        sc, mn = _scale_min_k4(blocks[..., 4:16])
        dl = d * sc.astype(np.float32)
        ml = _half(blocks, 2) * mn.astype(np.float32)
        qs = 16 if name == "Q4_K" else 48
        # per 64-chunk c, byte qs[32c + l]: element l low nibble, element l + 32 high nibble
        q = _bits(blocks, qs + 32 * (_E // 64) + _E % 32, 4 * ((_E % 64) // 32), 15)
        if name == "Q5_K":
            q = q | (_bits(blocks, 16 + _E % 32, _E // 32, 1) << 4)
    elif name == "Q6_K":
        dl = d * blocks[..., 192:208].view(np.int8).astype(np.float32)
        h, w = _E // 128, _E % 128
        k, l = w // 32, w % 32
        lo = _bits(blocks, 64 * h + l + 32 * (k % 2), 4 * (k // 2), 15)
        hi = _bits(blocks, 128 + 32 * h + l, 2 * k, 3)
        q = (lo | (hi << 4)) - 32
    else:
        raise KeyError(name)
    dl_e = dl[..., sub].reshape(rows, row_length)
    ml_e = np.zeros_like(dl_e) if ml is None else ml[..., sub].reshape(rows, row_length)
    return dl_e, q.reshape(rows, row_length), ml_e


def dequantize(raw: np.ndarray, name: str, row_length: int) -> np.ndarray:
    """Packed (rows, row_bytes) -> float32 (rows, row_length), bit-identical to gguf-py."""
    dl, q, ml = parts(raw, name, row_length)
    w = dl * q.astype(np.float32)
    if HAS_MIN[name]:
        w = w - ml
    return w.astype(np.float32)


def matvec(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """Exact-arithmetic target of the kernels: sum_j (dl_j q_j - ml_j) x_j in float64 from
    the unrounded parts (the float32 subtraction of ``dequantize`` is not applied)."""
    x = np.asarray(x, dtype=np.float64)
    dl, q, ml = parts(raw, name, x.shape[-1])
    w = dl.astype(np.float64) * q - ml.astype(np.float64)
    return x @ w.T


def matmul(raw: np.ndarray, name: str, X: np.ndarray) -> np.ndarray:
    """float64 X @ W.T with the exact weights, (T, out)."""
    return matvec(raw, name, X)


def error_scale(raw: np.ndarray, name: str, x: np.ndarray) -> np.ndarray:
    """sum_j (|dl_j q_j| + |ml_j|) |x_j| per output (x (in,) or (T, in)): the magnitude the
    float32 rounding error of a kernel's product is relative to (the kernels sum the scale
    and min parts separately)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    dl, q, ml = parts(raw, name, x.shape[-1])
    a = np.abs(dl.astype(np.float64) * q) + np.abs(ml.astype(np.float64))
    return x @ a.T


def random_blocks(
    rng: np.random.Generator, name: str, rows: int, row_length: int, log10_range=(-5.0, 1.0)
) -> np.ndarray:
    """Random valid packed bytes (rows, row_bytes): every quant, scale and min byte uniform;
    d and dmin finite halves of magnitude 10**U(log10_range) per super-block (the default
    reaches below 6.1e-5, so f16 subnormals occur too), positive for the types with mins
    (as GGML writes them), of either sign for Q3_K/Q6_K."""
    size = TYPE_SIZE[name]
    nb = row_length // QK_K
    raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for off in HALF_OFFSETS[name]:
        if off is None:
            continue
        mag = 10.0 ** rng.uniform(*log10_range, size=(rows, nb))
        if name in ("Q3_K", "Q6_K"):  # symmetric: any sign of d
            mag = mag * rng.choice([-1.0, 1.0], size=mag.shape)
        raw[..., off : off + 2] = mag.astype(_F16).view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * size)
