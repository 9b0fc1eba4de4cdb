"""llama.cpp's quantization mixes: which block type each tensor of a "Q4_K_M" file gets.

A mix has a default type and bumps the tensors that hurt most when quantized coarsely
(attn_v, ffn_down, attn_output, the output projection), following
``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp. Tensors are recognised by their
role (llama.cpp's category, from the family's table in ``arch/``) and layer index. Rows the chosen type cannot hold fall back as in
llama.cpp: IQ4_XS -> IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..blocks import by_name


@dataclass(frozen=True)
class Mix:
    name: str  # lower-case CLI name, e.g. "q4_k_m"
    default: str  # block type of ordinary matrices
    ftype: int  # llama_ftype, written to GGUF's general.file_type


MIXES = {
    m.name: m
    for m in (
        Mix("q4_0", "Q4_0", 2),
        Mix("q4_1", "Q4_1", 3),
        Mix("q8_0", "Q8_0", 7),
        Mix("q5_0", "Q5_0", 8),
        Mix("q5_1", "Q5_1", 9),
        Mix("q2_k", "Q2_K", 10),
        Mix("q3_k_s", "Q3_K", 11),
        Mix("q3_k_m", "Q3_K", 12),
        Mix("q3_k_l", "Q3_K", 13),
        Mix("q4_k_s", "Q4_K", 14),
        Mix("q4_k_m", "Q4_K", 15),
        Mix("q5_k_s", "Q5_K", 16),
        Mix("q5_k_m", "Q5_K", 17),
        Mix("q6_k", "Q6_K", 18),
        # llama.cpp's 4-bit non-linear i-quants (LLAMA_FTYPE_MOSTLY_IQ4_NL / _IQ4_XS)
        Mix("iq4_nl", "IQ4_NL", 25),
        Mix("iq4_xs", "IQ4_XS", 30),
        # unquantized references: every matrix in one float type
        Mix("f32", "F32", 0),
        Mix("f16", "F16", 1),
        Mix("bf16", "BF16", 32),
    )
}
# llama.cpp's quantized mixes (K-quant and IQ4 ones): methods that take --calib/--imatrix
K_MIXES = tuple(n for n in MIXES if "_k" in n or n.startswith("iq"))

_FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_gqa: int  # attention heads per KV head
    n_expert: int = 0  # experts per MoE layer (llama.cpp's hparams.n_expert)


def model_shape(n_layers: int, n_heads: int, n_kv_heads: int, n_expert: int = 0) -> ModelShape:
    return ModelShape(n_layers, max(n_heads // max(n_kv_heads, 1), 1), n_expert)


def output_type(mix: Mix, row_length: int) -> str:
    """The output projection (or tied embedding): Q6_K, or Q8_0 where Q6_K cannot hold the rows."""
    if by_name(mix.default).is_float:
        return mix.default
    if mix.default == "Q8_0" or row_length % by_name(mix.default).block_size:
        return "Q8_0"
    if row_length % 256:
        return "Q8_0"
    return "Q6_K"


def mix_type(mix: Mix, role: str, i: int | None, shape: ModelShape, has_imatrix: bool = False) -> str:
    """The type llama.cpp's mix gives a tensor of ``role`` in layer ``i`` (before the row-length
    fallback). Expert tensors (``ffn_down_exps`` ...) count as their dense category."""
    if by_name(mix.default).is_float:
        return mix.default
    cat, f = role.removesuffix("_exps").removesuffix("_shexp"), mix.name
    n = shape.n_layers
    # llama.cpp's rules for 8-expert models (Mixtral 8x7B / 8x22B): attn_v and attn_k in Q8_0,
    # attn_output in Q5_K for the low mixes (and none of the dense attn_output bumps)
    eight = shape.n_expert == 8 and f in MIXES
    if eight and cat in ("attn_v", "attn_qkv", "attn_k"):
        return "Q8_0"
    if eight and cat == "attn_output":
        return "Q5_K" if f in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs") else mix.default
    # a fused attn_qkv takes attn_v's rules: llama.cpp's category_is_attn_v() covers it, and its own
    # branch (q4_k_m -> Q5_K ...) comes after and is never reached (llama.cpp as vendored by
    # llama-cpp-python 0.3.36, src/llama-quant.cpp)
    if cat == "attn_v" or cat == "attn_qkv":
        if f == "q2_k":
            return "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
        if f == "q3_k_m":
            return "Q5_K" if i is not None and i < 2 else "Q4_K"
        if f == "q3_k_l":
            return "Q5_K"
        if f in ("q4_k_m", "q5_k_m") and i is not None and use_more_bits(i, n):
            return "Q6_K"
        if f in ("iq4_nl", "iq4_xs") and shape.n_gqa >= 4:
            return "Q5_K"
        if f == "q4_k_s" and i is not None and i < 4:
            return "Q5_K"
        return mix.default
    if cat == "ffn_down" and i is not None:
        if f == "q2_k":
            return "Q3_K"
        if f == "q3_k_m":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if f == "q3_k_l":
            return "Q5_K"
        if f in ("q4_k_m", "q5_k_m"):
            return "Q6_K" if use_more_bits(i, n) else mix.default
        if f in ("iq4_nl", "iq4_xs") and not has_imatrix and i < n // 8:
            return "Q5_K"
        if f == "q4_k_s" and i < n // 8:
            return "Q5_K"
        if f in ("q4_0", "q5_0") and has_imatrix and i < n // 8:
            return "Q4_1" if f == "q4_0" else "Q5_1"
        return mix.default
    if cat == "attn_output":
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(f, mix.default)
    return mix.default


def groupwise_mix(bits: int, group: int) -> Mix:
    """Every matrix in the group-wise integer type I{bits}G{group} (GPTQ, AWQ, group-wise RTN)."""
    return Mix(f"i{bits}g{group}", f"I{bits}G{group}", 1024)  # 1024: llama_ftype "guessed"


def _groupwise_fallback(type_name: str, row_length: int) -> str | None:
    m = re.fullmatch(r"I(\d)G(\d+)", type_name)
    if not m:
        return None
    for g in (64, 32):
        if g < int(m.group(2)) and row_length % g == 0:
            return f"I{m.group(1)}G{g}"
    return "F16"


def fallback(type_name: str, row_length: int) -> tuple[str, str | None]:
    """A type that can hold rows of ``row_length``: the same, llama.cpp's fallback, or F16."""
    if row_length % by_name(type_name).block_size == 0:
        return type_name, None
    first = _groupwise_fallback(type_name, row_length) or _FALLBACK.get(type_name, "F16")
    if row_length % by_name(first).block_size:
        first = "F16"
    block = by_name(type_name).block_size
    return first, f"fallback: rows of {row_length} are not a multiple of {type_name}'s block of {block}"
