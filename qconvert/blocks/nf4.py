"""bitsandbytes' NF4 (4-bit NormalFloat) as block types: NF4 and NF4_DQ.

Both cut a row into blocks of 64 values, each stored as 16 NormalFloat code indices per 8
bytes: byte ``j`` of the 32-byte ``qs`` holds element ``2j`` in its **high** nibble and element
``2j + 1`` in its low nibble (bitsandbytes' order). Value = ``NF4_VALUES[q] * absmax``.

- ``NF4`` (id 256, 36 bytes, 4.5 bits/weight): ``absmax`` f32 | ``qs[32]``.
- ``NF4_DQ`` (id 257, 33 bytes, 4.125 bits/weight + side data): ``qa`` u8 | ``qs[32]``; the
  block's absmax is double-quantized as bitsandbytes' ``compress_statistics=True`` does:
  ``absmax = DYNAMIC_CODE[qa] * absmax2[g] + offset`` with ``g`` = (block index in the
  flattened tensor) // 256. ``offset`` and the per-256-block ``absmax2`` (f32) are the
  tensor's params: ``{"dq_absmax2": [...], "dq_block": 256, "dq_offset": x}`` (FORMAT.md §4).

Rows must be a multiple of 64 values, so blocks never straddle rows and the row-major block
order is bitsandbytes' flat block order: for a tensor whose rows are a multiple of 64 the
bytes decode to exactly what ``bitsandbytes.functional.dequantize_4bit`` returns for the same
quantization state (tests/test_nf4.py checks it against bitsandbytes 0.50.2 on the CPU).

Quantization rules, all arithmetic float32 (one rounding per operation, in the order written):

- 4-bit codes (bitsandbytes' CPU/default path): ``absmax = max|x|``;
  ``inv = 1 / max(absmax, f32(1e-38))``; ``s = clamp(x * inv, -1, 1)``;
  ``q = #{k : BOUNDS[k] < s}`` with ``BOUNDS[k] = (NF4_VALUES[k] + NF4_VALUES[k+1]) / 2``
  (a value exactly on a midpoint takes the lower code).
- Double quantization (NF4_DQ): ``offset = f32(fsum(absmax) / n_blocks)`` (the mean,
  correctly summed; bitsandbytes uses torch's float32 ``mean()``, whose last bit depends on
  the CPU's vector width and thread count - pass ``offset=`` to :func:`quantize_nf4_dq` to
  reproduce a given state); ``v = absmax - offset``; per group of 256 blocks
  ``absmax2 = max|v|`` and ``qa = LUT[trunc((clamp(v * (1/absmax2), -1, 1) + 1) * 0.5 * 65535
  + 0.5)]`` (``qa = 0`` when ``absmax2 == 0``), where ``LUT[i]`` is the number of midpoints
  ``0.5 * (DYNAMIC_CODE[k] + DYNAMIC_CODE[k+1])`` below ``-1 + (2 * i) / 65535``: bitsandbytes
  0.50's CPU ``quantize_blockwise`` (a 65536-entry lookup, not an exact nearest search).
"""

from __future__ import annotations

import json
import math

import numpy as np
from numba import njit, prange

from ..errors import QConvertError
from .registry import BlockType, register

QK = 64  # elements per block
DQ_BLOCK = 256  # NF4 blocks per double-quantization group (bitsandbytes' blocksize 256)
_F32 = np.float32
_CHUNK = 1 << 14  # blocks per pass (4 MiB of float32)

# bitsandbytes.functional.get_4bit_type("nf4"): 16 quantiles of N(0, 1) scaled to [-1, 1].
NF4_VALUES = np.array(
    [0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
     0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000],
    dtype=np.uint32,
).view(np.float32)  # fmt: skip
NF4_BOUNDS = ((NF4_VALUES[:-1] + NF4_VALUES[1:]) / _F32(2)).astype(np.float32)

# bitsandbytes.functional.create_dynamic_map() (signed, 7 exponent bits, 8 bits), sorted:
# 127 negative values, 0, 127 positive values (the negations), 1.0. Index 0 is -0.99296874.
DYNAMIC_CODE = np.array(
    [0xBF7E3333, 0xBF7A999A, 0xBF770000, 0xBF736666, 0xBF6FCCCD, 0xBF6C3333, 0xBF68999A, 0xBF650000,
     0xBF616666, 0xBF5DCCCD, 0xBF5A3333, 0xBF56999A, 0xBF530000, 0xBF4F6666, 0xBF4BCCCD, 0xBF483333,
     0xBF44999A, 0xBF410000, 0xBF3D6666, 0xBF39CCCD, 0xBF363334, 0xBF32999A, 0xBF2F0000, 0xBF2B6666,
     0xBF27CCCD, 0xBF243334, 0xBF20999A, 0xBF1D0000, 0xBF196666, 0xBF15CCCD, 0xBF123334, 0xBF0E999A,
     0xBF0B0000, 0xBF076666, 0xBF03CCCC, 0xBF003333, 0xBEF93332, 0xBEF20000, 0xBEEACCCC, 0xBEE3999A,
     0xBEDC6666, 0xBED53333, 0xBECE0000, 0xBEC6CCCC, 0xBEBF999A, 0xBEB86666, 0xBEB13333, 0xBEAA0000,
     0xBEA2CCCC, 0xBE9B999A, 0xBE946666, 0xBE8D3334, 0xBE860000, 0xBE7D9999, 0xBE6F3333, 0xBE60CCCD,
     0xBE526666, 0xBE440000, 0xBE35999A, 0xBE273333, 0xBE18CCCD, 0xBE0A6666, 0xBDF80000, 0xBDDB3334,
     0xBDC9EB85, 0xBDC428F7, 0xBDBE6667, 0xBDB8A3D7, 0xBDB2E148, 0xBDAD1EB8, 0xBDA75C2A, 0xBDA1999A,
     0xBD9BD70A, 0xBD96147B, 0xBD9051EB, 0xBD8A8F5D, 0xBD84CCCD, 0xBD7E147B, 0xBD728F5D, 0xBD670A3D,
     0xBD5B851F, 0xBD500000, 0xBD447AE1, 0xBD38F5C3, 0xBD2D70A3, 0xBD21EB85, 0xBD166667, 0xBD0AE148,
     0xBCFEB852, 0xBCE7AE15, 0xBCD0A3D7, 0xBCB9999A, 0xBCA28F5D, 0xBC8B851F, 0xBC68F5C3, 0xBC3AE148,
     0xBC1F3B64, 0xBC160418, 0xBC0CCCCD, 0xBC039581, 0xBBF4BC6A, 0xBBE24DD3, 0xBBCFDF3B, 0xBBBD70A4,
     0xBBAB020D, 0xBB989374, 0xBB8624DD, 0xBB676C8A, 0xBB428F5C, 0xBB1DB22D, 0xBAF1A9FC, 0xBAA7EF9D,
     0xBA7765FF, 0xBA59E83E, 0xBA3C6A80, 0xBA1EECC1, 0xBA016F01, 0xB9C7E283, 0xB98CE705, 0xB923D70B,
     0xB8BA1F4B, 0xB88AEFB3, 0xB8378034, 0xB7B24206, 0xB70205FF, 0xB65A1A94, 0xB513A3B7, 0x00000000,
     0x3513A3B7, 0x365A1A94, 0x370205FF, 0x37B24206, 0x38378034, 0x388AEFB3, 0x38BA1F4B, 0x3923D70B,
     0x398CE705, 0x39C7E283, 0x3A016F01, 0x3A1EECC1, 0x3A3C6A80, 0x3A59E83E, 0x3A7765FF, 0x3AA7EF9D,
     0x3AF1A9FC, 0x3B1DB22D, 0x3B428F5C, 0x3B676C8A, 0x3B8624DD, 0x3B989374, 0x3BAB020D, 0x3BBD70A4,
     0x3BCFDF3B, 0x3BE24DD3, 0x3BF4BC6A, 0x3C039581, 0x3C0CCCCD, 0x3C160418, 0x3C1F3B64, 0x3C3AE148,
     0x3C68F5C3, 0x3C8B851F, 0x3CA28F5D, 0x3CB9999A, 0x3CD0A3D7, 0x3CE7AE15, 0x3CFEB852, 0x3D0AE148,
     0x3D166667, 0x3D21EB85, 0x3D2D70A3, 0x3D38F5C3, 0x3D447AE1, 0x3D500000, 0x3D5B851F, 0x3D670A3D,
     0x3D728F5D, 0x3D7E147B, 0x3D84CCCD, 0x3D8A8F5D, 0x3D9051EB, 0x3D96147B, 0x3D9BD70A, 0x3DA1999A,
     0x3DA75C2A, 0x3DAD1EB8, 0x3DB2E148, 0x3DB8A3D7, 0x3DBE6667, 0x3DC428F7, 0x3DC9EB85, 0x3DDB3334,
     0x3DF80000, 0x3E0A6666, 0x3E18CCCD, 0x3E273333, 0x3E35999A, 0x3E440000, 0x3E526666, 0x3E60CCCD,
     0x3E6F3333, 0x3E7D9999, 0x3E860000, 0x3E8D3334, 0x3E946666, 0x3E9B999A, 0x3EA2CCCC, 0x3EAA0000,
     0x3EB13333, 0x3EB86666, 0x3EBF999A, 0x3EC6CCCC, 0x3ECE0000, 0x3ED53333, 0x3EDC6666, 0x3EE3999A,
     0x3EEACCCC, 0x3EF20000, 0x3EF93332, 0x3F003333, 0x3F03CCCC, 0x3F076666, 0x3F0B0000, 0x3F0E999A,
     0x3F123334, 0x3F15CCCD, 0x3F196666, 0x3F1D0000, 0x3F20999A, 0x3F243334, 0x3F27CCCD, 0x3F2B6666,
     0x3F2F0000, 0x3F32999A, 0x3F363334, 0x3F39CCCD, 0x3F3D6666, 0x3F410000, 0x3F44999A, 0x3F483333,
     0x3F4BCCCD, 0x3F4F6666, 0x3F530000, 0x3F56999A, 0x3F5A3333, 0x3F5DCCCD, 0x3F616666, 0x3F650000,
     0x3F68999A, 0x3F6C3333, 0x3F6FCCCD, 0x3F736666, 0x3F770000, 0x3F7A999A, 0x3F7E3333, 0x3F800000],
    dtype=np.uint32,
).view(np.float32)  # fmt: skip

_LUT_SIZE = 65536
_lut: np.ndarray | None = None


def dynamic_lut() -> np.ndarray:
    """bitsandbytes' 8-bit quantization lookup (uint8, 65536): LUT[i] = number of midpoints
    of DYNAMIC_CODE below -1 + (2*i)/65535 (float32)."""
    global _lut
    if _lut is None:
        mid = (_F32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])).astype(np.float32)
        i = np.arange(_LUT_SIZE, dtype=np.float32)
        val = (_F32(-1.0) + (_F32(2.0) * i) / _F32(_LUT_SIZE - 1)).astype(np.float32)
        _lut = np.searchsorted(mid, val, side="left").astype(np.uint8)
        _lut.flags.writeable = False
    return _lut


# --- the 4-bit part (shared) ---------------------------------------------------------------


def _nf4_codes_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64) float32 -> (packed (n, 32) uint8, absmax (n,) float32); the plain statement of
    the rule (tests check :func:`_nf4_codes` against it)."""
    absmax = np.abs(x).max(axis=1)
    inv = _F32(1.0) / np.maximum(absmax, _F32(1e-38))
    s = np.clip(x * inv[:, None], _F32(-1.0), _F32(1.0))
    q = np.searchsorted(NF4_BOUNDS, s.reshape(-1), side="left").astype(np.uint8).reshape(x.shape)
    return (q[:, 0::2] << np.uint8(4)) | q[:, 1::2], absmax


@njit(cache=True, parallel=True)
def _nf4_codes_kernel(x, bounds, qs, absmax):  # pragma: no cover - compiled
    one = np.float32(1.0)
    for i in prange(x.shape[0]):
        am = np.float32(0.0)
        for j in range(QK):
            a = abs(x[i, j])
            if a > am:
                am = a
        absmax[i] = am
        inv = one / max(am, np.float32(1e-38))
        for j in range(QK // 2):
            byte = 0
            for h in range(2):
                s = min(max(x[i, 2 * j + h] * inv, -one), one)
                q = 0
                for k in range(15):
                    if bounds[k] < s:
                        q += 1
                byte = byte * 16 + q
            qs[i, j] = byte


def _nf4_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64) float32 -> (packed (n, 32) uint8, absmax (n,) float32): the 4-bit codes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    qs = np.empty((x.shape[0], QK // 2), dtype=np.uint8)
    absmax = np.empty(x.shape[0], dtype=np.float32)
    if x.shape[0]:
        _nf4_codes_kernel(x, NF4_BOUNDS, qs, absmax)
    return qs, absmax


def _nf4_values(qs: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """(n, 32) packed bytes, (n,) float32 absmax -> (n, 64) float32 = NF4_VALUES[q] * absmax."""
    q = np.empty((qs.shape[0], QK), dtype=np.uint8)
    q[:, 0::2] = qs >> np.uint8(4)
    q[:, 1::2] = qs & np.uint8(0x0F)
    return NF4_VALUES[q] * absmax.astype(np.float32, copy=False)[:, None]


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield slice(start, min(n, start + _CHUNK))


# --- NF4: absmax f32 | qs[32] ---------------------------------------------------------------


def _nf4_quantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, dtype=np.float32)
    out = np.empty((blocks.shape[0], 36), dtype=np.uint8)
    for sl in _chunks(blocks.shape[0]):
        qs, absmax = _nf4_codes(blocks[sl])
        out[sl, 0:4] = absmax.astype("<f4")[:, None].view(np.uint8)
        out[sl, 4:36] = qs
    return out


def _nf4_dequantize(blocks: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty((blocks.shape[0], QK), dtype=np.float32)
    for sl in _chunks(blocks.shape[0]):
        b = blocks[sl]
        absmax = np.ascontiguousarray(b[:, 0:4]).view("<f4").reshape(-1)
        out[sl] = _nf4_values(b[:, 4:36], absmax)
    return out


# --- NF4_DQ: qa u8 | qs[32], params dq_offset / dq_absmax2 / dq_block --------------------------


def json_f32(v) -> float:
    """A float32 as the Python float to put in JSON: the shortest decimal that reads back
    (float64 parse, then rounding to float32) as exactly ``v``; the exact value otherwise."""
    v = np.float32(v)
    short = float(str(v))
    return short if np.float32(short) == v and math.isfinite(short) else float(v)


def dq_params(offset: np.float32, absmax2: np.ndarray) -> dict:
    return {
        "dq_absmax2": [json_f32(a) for a in np.asarray(absmax2, dtype=np.float32)],
        "dq_block": DQ_BLOCK,
        "dq_offset": json_f32(offset),
    }


def dq_state(params: dict, n_blocks: int) -> tuple[np.float32, np.ndarray]:
    """Validated (offset f32, absmax2 f32 array) from a tensor's params."""
    if not isinstance(params, dict) or "dq_offset" not in params or "dq_absmax2" not in params:
        raise QConvertError(
            "an NF4_DQ tensor needs its params (dq_offset, dq_absmax2, dq_block); none were given"
        )
    block = params.get("dq_block", DQ_BLOCK)
    if block != DQ_BLOCK:
        raise QConvertError(f"NF4_DQ params: dq_block must be {DQ_BLOCK}, got {block!r}")
    try:
        offset = np.float32(float(params["dq_offset"]))
        absmax2 = np.asarray([float(a) for a in params["dq_absmax2"]], dtype=np.float64).astype(np.float32)
    except (TypeError, ValueError):
        raise QConvertError("NF4_DQ params: dq_offset and dq_absmax2 must be numbers") from None
    want = -(-n_blocks // DQ_BLOCK)
    if absmax2.shape != (want,):
        raise QConvertError(
            f"NF4_DQ params: {n_blocks} blocks need {want} dq_absmax2 values, got {absmax2.size}"
        )
    if not (np.isfinite(offset) and np.isfinite(absmax2).all()):
        raise QConvertError("NF4_DQ params: dq_offset and dq_absmax2 must be finite")
    return offset, absmax2


def dq_absmax(qa: np.ndarray, first_block: int, offset: np.float32, absmax2: np.ndarray) -> np.ndarray:
    """Per-block absmax of blocks first_block, first_block+1, ... from their 8-bit indices:
    DYNAMIC_CODE[qa] * absmax2[block // 256] + offset (two float32 roundings, no FMA)."""
    idx = np.arange(first_block, first_block + qa.shape[0]) // DQ_BLOCK
    return (DYNAMIC_CODE[qa] * absmax2[idx]).astype(np.float32) + np.float32(offset)


def params_max_len(shape: tuple[int, ...]) -> int:
    """An upper bound on the canonical JSON length of an NF4_DQ tensor's params (a writer can
    reserve this much header space before the tensor is quantized)."""
    n = int(np.prod(shape, dtype=np.int64)) // QK
    n2 = -(-n // DQ_BLOCK)
    # '{"dq_absmax2":[...],"dq_block":256,"dq_offset":X}'; a finite non-negative float's
    # repr has at most 23 characters
    return len('{"dq_absmax2":[],"dq_block":256,"dq_offset":}') + 24 * (n2 + 1)


def params_bits(params: dict) -> int:
    """Bits of side data in the params, counted as stored binary f32 (for bits-per-weight)."""
    return 32 * (len(params.get("dq_absmax2", ())) + 1) if params else 0


def quantize_nf4_dq(values: np.ndarray, offset: float | None = None) -> tuple[np.ndarray, dict]:
    """(rows, row_length) float32, row_length % 64 == 0 -> ((rows, row_bytes) uint8, params).

    ``offset``: the double-quantization offset to use instead of the mean of the block absmax
    (e.g. bitsandbytes' own ``QuantState.offset``, to reproduce its state bit for bit)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = values.shape
    if n % QK:
        raise QConvertError(f"NF4_DQ needs rows that are a multiple of {QK} elements, got {n}")
    blocks = values.reshape(-1, QK)
    nb = blocks.shape[0]
    out = np.empty((nb, 33), dtype=np.uint8)
    absmax = np.empty(nb, dtype=np.float32)
    for sl in _chunks(nb):
        out[sl, 1:33], absmax[sl] = _nf4_codes(blocks[sl])
    if offset is None:
        offset = math.fsum(absmax.astype(np.float64).tolist()) / nb if nb else 0.0
    offset = np.float32(offset)
    v = absmax - offset
    n2 = -(-nb // DQ_BLOCK)
    vp = np.zeros(n2 * DQ_BLOCK, dtype=np.float32)
    vp[:nb] = v
    groups = vp.reshape(n2, DQ_BLOCK)
    absmax2 = np.abs(groups).max(axis=1)  # the zero padding never raises a maximum
    inv2 = np.zeros_like(absmax2)
    np.divide(_F32(1.0), absmax2, out=inv2, where=absmax2 != 0)
    normed = np.clip(groups * inv2[:, None], _F32(-1.0), _F32(1.0))
    t = ((normed + _F32(1.0)) * _F32(0.5) * _F32(_LUT_SIZE - 1) + _F32(0.5)).astype(np.float32)
    qa = dynamic_lut()[t.astype(np.uint16)]
    qa[absmax2 == 0] = 0
    out[:, 0] = qa.reshape(-1)[:nb]
    return out.reshape(rows, -1), dq_params(offset, absmax2)


def dequantize_nf4_dq(blocks: np.ndarray, params: dict) -> np.ndarray:
    """(n_blocks, 33) bytes of a whole tensor (flat block order) -> (n_blocks, 64) float32."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    offset, absmax2 = dq_state(params, blocks.shape[0])
    out = np.empty((blocks.shape[0], QK), dtype=np.float32)
    for sl in _chunks(blocks.shape[0]):
        b = blocks[sl]
        out[sl] = _nf4_values(b[:, 1:33], dq_absmax(b[:, 0], sl.start, offset, absmax2))
    return out


def _nf4_dq_blocks_need_params(blocks: np.ndarray) -> np.ndarray:
    raise QConvertError("NF4_DQ blocks decode only with their tensor's params (dq_offset, dq_absmax2)")


_LAYOUT = "16 NF4 code indices per 8 bytes, element 2j in the high nibble of byte j, 2j+1 in the low"

NF4 = register(
    BlockType(
        id=256,
        name="NF4",
        block_size=QK,
        type_size=36,
        quantize_blocks=_nf4_quantize,
        dequantize_blocks=_nf4_dequantize,
        ggml=False,
        description=f"x = NF4[q] * absmax; absmax: f32, 32 bytes of 4-bit q ({_LAYOUT}); bitsandbytes nf4",
    )
)

NF4_DQ = register(
    BlockType(
        id=257,
        name="NF4_DQ",
        block_size=QK,
        type_size=33,
        quantize_blocks=None,
        dequantize_blocks=_nf4_dq_blocks_need_params,
        ggml=False,
        description="x = NF4[q] * (DYN8[qa] * dq_absmax2[block // 256] + dq_offset); qa: u8, "
        f"32 bytes of 4-bit q ({_LAYOUT}); params dq_offset, dq_absmax2; bitsandbytes nf4 + compress_statistics",
        quantize_tensor=quantize_nf4_dq,
        dequantize_tensor=dequantize_nf4_dq,
        params_max_len=params_max_len,
        params_bits=params_bits,
    )
)

__all__ = [
    "DQ_BLOCK",
    "DYNAMIC_CODE",
    "NF4",
    "NF4_BOUNDS",
    "NF4_DQ",
    "NF4_VALUES",
    "dequantize_nf4_dq",
    "dq_absmax",
    "dq_state",
    "dynamic_lut",
    "json_f32",
    "quantize_nf4_dq",
]

