"""Plain float block types: F32, F16, BF16 (one element per block, little-endian).

F16 and BF16 are written with round-to-nearest-even, bit-identical to GGML
(``GGML_FP32_TO_FP16`` / ``ggml_compute_fp32_to_bf16``) and gguf-py.
"""

from __future__ import annotations

import numpy as np

from .registry import BlockType, register

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")


def _as_f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks, dtype=_F32)


def _as_u8(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks, dtype=np.uint8)


# --- F32 ---------------------------------------------------------------------------------


def _f32_quantize(blocks: np.ndarray) -> np.ndarray:
    return _as_f32(blocks).reshape(-1, 1).view(np.uint8)


def _f32_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _as_u8(blocks).reshape(-1, 4).view(_F32).astype(np.float32)


# --- F16 ---------------------------------------------------------------------------------


def _f16_quantize(blocks: np.ndarray) -> np.ndarray:
    # numpy's float32 -> float16 cast is a single correctly rounded (nearest-even) step.
    return _as_f32(blocks).reshape(-1, 1).astype(_F16).view(np.uint8)


def _f16_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _as_u8(blocks).reshape(-1, 2).view(_F16).astype(np.float32)


# --- BF16 --------------------------------------------------------------------------------


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), as GGML's ``ggml_compute_fp32_to_bf16``.

    NaN: keep sign and top 7 mantissa bits, force the quiet bit (0x0040). Everything else
    (inf included): round-to-nearest-even on the dropped low 16 bits.
    """
    bits = np.ascontiguousarray(values, dtype=_F32).view(_U32)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    # No overflow in u32: the largest non-NaN pattern 0xFF800000 + 0x8000 < 2**32.
    rounded = (np.where(is_nan, np.uint32(0), bits) + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)
    nan_bits = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(is_nan, nan_bits, rounded).astype(_U16)


def _bf16_quantize(blocks: np.ndarray) -> np.ndarray:
    return f32_to_bf16_bits(blocks).reshape(-1, 1).view(np.uint8)


def _bf16_dequantize(blocks: np.ndarray) -> np.ndarray:
    hi = _as_u8(blocks).reshape(-1, 2).view(_U16).astype(np.uint32) << np.uint32(16)
    return hi.view(np.float32)


F32 = register(
    BlockType(
        id=0,
        name="F32",
        block_size=1,
        type_size=4,
        quantize_blocks=_f32_quantize,
        dequantize_blocks=_f32_dequantize,
        description="x = the IEEE binary32 value, 4 bytes little-endian",
        is_float=True,
    )
)

F16 = register(
    BlockType(
        id=1,
        name="F16",
        block_size=1,
        type_size=2,
        quantize_blocks=_f16_quantize,
        dequantize_blocks=_f16_dequantize,
        description="x = the IEEE binary16 value, 2 bytes little-endian; written round-to-nearest-even",
        is_float=True,
    )
)

BF16 = register(
    BlockType(
        id=30,
        name="BF16",
        block_size=1,
        type_size=2,
        quantize_blocks=_bf16_quantize,
        dequantize_blocks=_bf16_dequantize,
        description="x = f32 whose top 16 bits are the u16 (little-endian), low 16 bits zero; "
        "written round-to-nearest-even, NaN kept NaN (quiet bit set)",
        is_float=True,
    )
)
