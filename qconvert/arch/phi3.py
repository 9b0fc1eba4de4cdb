"""Phi-3 (Phi-3 / Phi-3.5 mini and medium, Phi-4-mini): the Llama block with fused projections.

    q | k | v = qkv_proj(rmsnorm(x))                      rows: all q heads, then k, then v
    x = x + o_proj(attention(rope(q), rope(k), v))        RoPE on the first rope_dim of each head
    gate | up = gate_up_proj(rmsnorm(x))                  rows: the gate half, then the up half
    x = x + down_proj(silu(gate) * up)

transformers applies ``sliding_window`` (when set) to every layer, and so does qconvert;
``partial_rotary_factor`` (Phi-4-mini: 0.75) rotates only the first part of each head.

llama.cpp (convert_hf_to_gguf's ``Phi3MiniModel``, src/models/phi3.cpp): architecture ``phi3``,
the fused matrices kept as they are -- ``attn_qkv``, and ``ffn_up`` holding gate and up
(2 * n_ff rows, no ``ffn_gate``) -- q/k rows in HF order (NEOX RoPE, no permutation),
``rope.dimension_count`` the rotated dimensions. llama.cpp reads ``attention.sliding_window``
but ignores it (it disables Phi's SWA); LongRoPE would travel as ``rope_factors_long`` /
``rope_factors_short`` tensors, which qconvert does not support yet (a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..errors import QConvertError
from ..runtime.ops import rms_norm, silu
from . import llama
from .base import MAX_POSITIONS, Arch, Context, InputGroup, K, Layer, T, cfg_int
from .ops import attend, fused_gated_mlp, partial_rope, split_heads

QKV = "self_attn.qkv_proj.weight"
O_PROJ = "self_attn.o_proj.weight"
GATE_UP = "mlp.gate_up_proj.weight"
DOWN = "mlp.down_proj.weight"
ATTN_NORM, FFN_NORM = llama.ATTN_NORM, llama.FFN_NORM

TENSORS = llama.GLOBAL_TENSORS + (
    T("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "attn_norm"),
    T("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", "attn_qkv"),
    T("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "attn_output"),
    T("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "ffn_norm"),
    # llama.cpp's phi3 ffn_up is HF's gate_up_proj as it is (gate rows first; ggml_swiglu splits it)
    T("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", "ffn_up"),
    T("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "ffn_down"),
)

GGUF_KV = tuple(k for k in llama.GGUF_KV if k.gguf != "rope.dimension_count") + (
    K("rope.dimension_count", "qconvert_rope_dim", "rope_dim", "u32"),
    K("rope.scaling.original_context_length", "original_max_position_embeddings", "original_max_positions", "u32"),
)


@dataclass(frozen=True)
class Phi3Config(llama.LlamaConfig):
    rope_dim: int = 0  # rotated dimensions of each head (head_dim * partial_rotary_factor)
    original_max_positions: int | None = None


def parse_config(cfg: dict) -> Phi3Config:
    if not isinstance(cfg, dict):
        raise QConvertError("model.config is not a JSON object")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise QConvertError(f"config.json rope_parameters is {rope!r}, not an object")
    scaling = cfg.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind not in (None, "default"):
        raise QConvertError(
            f"Phi-3 RoPE scaling {kind!r} (LongRoPE: the 128k-context Phi-3, Phi-3.5 and Phi-4-mini models) is not"
            " supported yet; only models without rope_scaling (e.g. Phi-3-mini-4k) are"
        )
    base = llama.parse_config(cfg, what=" Phi-3 model")
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise QConvertError(f"config.json partial_rotary_factor is {factor!r}; it must lie in (0, 1]")
    rope_dim = int(base.head_dim * factor)  # as transformers' Phi3RotaryEmbedding
    if rope_dim < 2 or rope_dim % 2:
        raise QConvertError(f"partial_rotary_factor {factor} rotates {rope_dim} of {base.head_dim} head dimensions;"
                            " RoPE needs an even, positive number")
    orig = cfg.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    if orig is not None:
        orig = cfg_int({"original_max_position_embeddings": orig}, "original_max_position_embeddings", hi=MAX_POSITIONS)
    return Phi3Config(**{f.name: getattr(base, f.name) for f in fields(base)}, rope_dim=rope_dim,
                      original_max_positions=orig)


# --------------------------------------------------------------------------------------------
# the block


def attention(cfg: Phi3Config, layer: Layer, h: np.ndarray, ctx: Context) -> np.ndarray:
    qkv = layer.linears((QKV,), h)[0]
    nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if qkv.shape[-1] != nq + 2 * nk:
        raise QConvertError(f"qkv_proj has {qkv.shape[-1]} rows; {cfg.n_heads} + 2 x {cfg.n_kv_heads} heads of"
                            f" {cfg.head_dim} need {nq + 2 * nk}")
    q = split_heads(qkv[..., :nq], cfg.n_heads, cfg.head_dim)
    k = split_heads(qkv[..., nq:nq + nk], cfg.n_kv_heads, cfg.head_dim)
    v = split_heads(qkv[..., nq + nk:], cfg.n_kv_heads, cfg.head_dim)
    cos, sin = ctx.rope(cfg.rope_dim, cfg.rope_theta, None)
    q, k = partial_rope(q, k, cos, sin)
    att = attend(q, k, v, ctx, layer.index, 1.0 / np.sqrt(cfg.head_dim), window=cfg.windows[layer.index])
    return layer.linears((O_PROJ,), att)[0]


def mlp(cfg: Phi3Config, layer: Layer, h: np.ndarray, ctx: Context | None = None) -> np.ndarray:
    return fused_gated_mlp(layer, h, silu, GATE_UP, DOWN)


def block(cfg: Phi3Config, layer: Layer, x: np.ndarray, ctx: Context) -> np.ndarray:
    x = x + attention(cfg, layer, rms_norm(x, layer.vector(ATTN_NORM), cfg.rms_eps), ctx)
    return x + mlp(cfg, layer, rms_norm(x, layer.vector(FFN_NORM), cfg.rms_eps))


def input_groups(cfg: Phi3Config, i: int) -> list[InputGroup]:
    """norm -> qkv; qkv's v rows -> o (no grouped-query attention); norm -> gate_up; gate_up's
    up rows -> down (exact: down reads silu(gate) * up, linear in up)."""
    groups = [InputGroup(ATTN_NORM, (QKV,), module="attn")]
    if cfg.n_kv_heads == cfg.n_heads:
        groups.append(InputGroup(QKV, (O_PROJ,), prev_kind="linear", prev_tail=True))
    groups += [InputGroup(FFN_NORM, (GATE_UP,), module="mlp"),
               InputGroup(GATE_UP, (DOWN,), prev_kind="linear", prev_tail=True)]
    return groups


# --------------------------------------------------------------------------------------------
# GGUF


def config_from_gguf(kv: dict, shapes: dict, config: dict) -> None:
    """llama's completion, with ``rope.dimension_count`` as transformers' partial_rotary_factor;
    ``attention.sliding_window`` 0 is convert_hf_to_gguf's "none" (Phi-4)."""
    if config.get("sliding_window") == 0:
        del config["sliding_window"]
    rope_dim = config.pop("qconvert_rope_dim", None)
    hidden, n_heads = config.get("hidden_size"), config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (hidden // n_heads if isinstance(hidden, int) and isinstance(n_heads, int)
                                          and n_heads > 0 else None)
    if rope_dim is not None and head_dim and rope_dim != head_dim:
        factor = rope_dim / head_dim
        if int(head_dim * factor) != rope_dim:
            raise QConvertError(f"GGUF model rotates {rope_dim} of {head_dim} head dimensions, which no"
                                " partial_rotary_factor expresses")
        config["partial_rotary_factor"] = factor
    llama.config_from_gguf(kv, shapes, config)
    arch = kv.get("general.architecture")
    if "rope_factors_long.weight" in shapes or kv.get(f"{arch}.rope.scaling.attn_factor") is not None:
        raise QConvertError("this Phi-3 GGUF uses LongRoPE (rope_factors_long / rope_factors_short), which qconvert"
                            " does not support yet")


PHI3 = Arch(
    name="phi3", model_types=("phi3",), gguf_arch="phi3", tensors=TENSORS, parse_config=parse_config,
    gguf_kv=GGUF_KV, hf_defaults={"architectures": ["Phi3ForCausalLM"], "hidden_act": "silu"},
    input_groups=input_groups, block=block, modules={"attn": attention, "mlp": mlp},
    config_from_gguf_extra=config_from_gguf,
    notes="fused qkv_proj and gate_up_proj kept fused (llama.cpp's attn_qkv and ffn_up)",
)
