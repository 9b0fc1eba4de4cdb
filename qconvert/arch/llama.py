"""The Llama family: Llama 1-3.x, Mistral, Qwen2/2.5, SmolLM -- and the pieces Qwen3 and the
mixture-of-experts files reuse.

    x = embed(ids)
    for each layer:
        x = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(.)), v_proj(.)))
        x = x + down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))
    logits = lm_head(rmsnorm(x))            # lm_head = embed when tied

Grouped-query attention, rotate-half RoPE (the container's convention, FORMAT.md §9; llama.cpp's
``llama`` GGUF architecture stores q/k rows pair-interleaved instead, ``qwen2`` does not),
optional q/k/v biases (Qwen2), a sliding window (Mistral; Qwen2 layers marked so), Llama 3's
RoPE frequency scaling (GGUF: the ``rope_freqs`` tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QConvertError
from ..runtime.ops import rms_norm, silu
from .base import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
                   Arch, Context, InputGroup, K, Layer, T, cfg_float, cfg_int, check_heads, rope_settings)
from .ops import attend, gated_mlp, qk_heads, rope

QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
O_PROJ = "self_attn.o_proj.weight"
GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
DOWN = "mlp.down_proj.weight"
ATTN_NORM = "input_layernorm.weight"
FFN_NORM = "post_attention_layernorm.weight"

GLOBAL_TENSORS = (
    T("model.embed_tokens.weight", "token_embd.weight", "token_embd"),
    T("model.norm.weight", "output_norm.weight", "output_norm"),
    T("lm_head.weight", "output.weight", "output"),
)
ATTENTION_TENSORS = (
    T("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "attn_norm"),
    T("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "attn_q"),
    T("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "attn_k"),
    T("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "attn_v"),
    T("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "attn_output"),
    T("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", "attn_q_bias"),
    T("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", "attn_k_bias"),
    T("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", "attn_v_bias"),
    T("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias", "attn_output_bias"),
    T("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "ffn_norm"),
)
MLP_TENSORS = (
    T("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "ffn_gate"),
    T("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "ffn_up"),
    T("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "ffn_down"),
)
TENSORS = GLOBAL_TENSORS + ATTENTION_TENSORS + MLP_TENSORS

# llama.cpp's hyper-parameter keys (prefixed with the GGUF architecture name)
GGUF_KV = (
    K("context_length", "max_position_embeddings", "max_positions", "u32"),
    K("embedding_length", "hidden_size", "hidden_size", "u32"),
    K("block_count", "num_hidden_layers", "n_layers", "u32"),
    K("feed_forward_length", "intermediate_size", "intermediate_size", "u32"),
    K("attention.head_count", "num_attention_heads", "n_heads", "u32"),
    K("attention.head_count_kv", "num_key_value_heads", "n_kv_heads", "u32"),
    K("attention.key_length", "head_dim", "head_dim", "u32"),
    K("attention.value_length", "head_dim", "head_dim", "u32"),
    K("rope.dimension_count", "qconvert_rope_dim", "head_dim", "u32"),
    K("rope.freq_base", "rope_theta", "rope_theta", "f32", 10000.0),
    K("attention.layer_norm_rms_epsilon", "rms_norm_eps", "rms_eps", "f32"),
    K("attention.sliding_window", "sliding_window", "sliding_window", "u32"),
    K("vocab_size", "vocab_size", "vocab_size", "u32"),
)


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    attention_bias: bool
    windows: tuple[int | None, ...]  # per layer: sliding window or None (full attention)
    tie_embeddings: bool
    rope_freq_factors: tuple[float, ...] | None  # llama.cpp's rope_freqs (a GGUF source)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE

    @property
    def sliding_window(self) -> int | None:
        return next((w for w in self.windows if w), None)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def parse_config(cfg: dict, qk_norm: bool = False, what: str = " Llama-family model") -> LlamaConfig:
    """Validated hyper-parameters; one clear error for anything missing or absurd."""
    if not isinstance(cfg, dict):
        raise QConvertError("model.config is not a JSON object")
    hidden = cfg_int(cfg, "hidden_size", hi=MAX_HIDDEN, what=what)
    n_heads = cfg_int(cfg, "num_attention_heads", hi=MAX_HEADS, what=what)
    n_kv = cfg_int(cfg, "num_key_value_heads", cfg.get("num_attention_heads"), hi=MAX_HEADS, what=what)
    explicit = cfg.get("head_dim") is not None
    if not explicit and hidden % n_heads:
        raise QConvertError(f"num_attention_heads {n_heads} does not divide hidden_size {hidden}")
    head_dim = cfg_int(cfg, "head_dim", hidden // n_heads, hi=MAX_HEAD_DIM, what=what)
    check_heads(hidden, n_heads, n_kv, head_dim, explicit)
    n_layers = cfg_int(cfg, "num_hidden_layers", hi=MAX_LAYERS, what=what)
    theta, scaling = rope_settings(cfg)
    model_type = str(cfg.get("model_type") or "llama")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise QConvertError(f"hidden_act {act!r} is not supported for {model_type} (silu)")
    windows = _windows(cfg, model_type, n_layers)
    factors = cfg.get("qconvert_rope_freq_factors")
    if factors is not None:
        if not (isinstance(factors, list) and len(factors) == head_dim // 2
                and all(isinstance(f, (int, float)) and np.isfinite(f) and f > 0 for f in factors)):
            raise QConvertError(f"qconvert_rope_freq_factors must be {head_dim // 2} positive numbers")
        factors = tuple(float(f) for f in factors)
    bias = cfg.get("attention_bias", model_type == "qwen2")
    if cfg.get("mlp_bias"):
        raise QConvertError("MLP biases (mlp_bias) are not supported")
    return LlamaConfig(
        model_type=model_type,
        vocab_size=cfg_int(cfg, "vocab_size", hi=MAX_VOCAB, what=what),
        hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", hi=MAX_INTERMEDIATE, what=what),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rms_eps=cfg_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_positions=cfg_int(cfg, "max_position_embeddings", 2048, hi=MAX_POSITIONS),
        attention_bias=bool(bias),
        windows=windows,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        rope_freq_factors=factors,
        qk_norm=qk_norm,
    )


def _windows(cfg: dict, model_type: str, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows: ``layer_types`` when the config has it (transformers 5),
    else Mistral's ``sliding_window`` on every layer, else none."""
    window = cfg.get("sliding_window")
    if window is not None:
        window = cfg_int(cfg, "sliding_window", hi=MAX_POSITIONS)
    types = cfg.get("layer_types")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        return (None,) * n_layers
    if isinstance(types, list):
        if len(types) != n_layers or not all(t in ("full_attention", "sliding_attention") for t in types):
            raise QConvertError(f"config.json layer_types must list {n_layers} of full_attention/sliding_attention")
        if "sliding_attention" in types and window is None:
            raise QConvertError("layer_types has sliding_attention layers but sliding_window is not set")
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n_layers


# --------------------------------------------------------------------------------------------
# the block


def attention(cfg: LlamaConfig, layer: Layer, h: np.ndarray, ctx: Context) -> np.ndarray:
    """h (B, T, H) -> o_proj(attention) (B, T, H)."""
    q, k, v = qk_heads(layer, h, QKV, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, layer.vector("self_attn.q_norm.weight"), cfg.rms_eps)
        k = rms_norm(k, layer.vector("self_attn.k_norm.weight"), cfg.rms_eps)
    cos, sin = ctx.rope(cfg.head_dim, cfg.rope_theta, _scaling(cfg))
    q, k = rope(q, k, cos, sin)
    att = attend(q, k, v, ctx, layer.index, 1.0 / np.sqrt(cfg.head_dim), window=cfg.windows[layer.index])
    return layer.linears((O_PROJ,), att)[0]


def _scaling(cfg: LlamaConfig) -> dict | None:
    if cfg.rope_freq_factors is not None:
        return {"rope_type": "freq_factors", "factors": cfg.rope_freq_factors}
    return cfg.rope_scaling


def mlp(cfg: LlamaConfig, layer: Layer, h: np.ndarray, ctx: Context | None = None) -> np.ndarray:
    return gated_mlp(layer, h, silu)


def block(cfg: LlamaConfig, layer: Layer, x: np.ndarray, ctx: Context) -> np.ndarray:
    x = x + attention(cfg, layer, rms_norm(x, layer.vector(ATTN_NORM), cfg.rms_eps), ctx)
    return x + mlp(cfg, layer, rms_norm(x, layer.vector(FFN_NORM), cfg.rms_eps))


def input_groups(cfg: LlamaConfig, i: int) -> list[InputGroup]:
    """norm -> q,k,v; v -> o (only when v's rows are o's columns: no grouped-query attention);
    norm -> gate,up; up -> down."""
    groups = [InputGroup(ATTN_NORM, QKV, module="attn")]
    if cfg.n_kv_heads == cfg.n_heads:
        groups.append(InputGroup(QKV[2], (O_PROJ,), prev_kind="linear"))
    groups += [InputGroup(FFN_NORM, GATE_UP, module="mlp"), InputGroup(GATE_UP[1], (DOWN,), prev_kind="linear")]
    return groups


# --------------------------------------------------------------------------------------------
# GGUF


def rope_freq_factors(cfg: LlamaConfig) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3 RoPE scaling: original / scaled frequency."""
    from ..runtime.ops import rope_inv_freq

    if cfg.rope_freq_factors is not None:
        return np.asarray(cfg.rope_freq_factors, np.float32)
    if cfg.rope_scaling is None or cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "llama3":
        return None
    base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
    return (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).astype(np.float32)


def extra_gguf_kv(cfg: LlamaConfig, config: dict) -> list:
    """Linear RoPE scaling as keys (Llama 3's scaling travels as the rope_freqs tensor)."""
    s = cfg.rope_scaling
    if s is not None and s.get("rope_type", s.get("type")) == "linear":
        return [("rope.scaling.type", "str", "linear"), ("rope.scaling.factor", "f32", float(s["factor"]))]
    return []


def config_from_gguf(kv: dict, shapes: dict, config: dict) -> None:
    """Completes a config read from GGUF: the vocabulary from the embedding, tying, biases."""
    config["vocab_size"] = int(shapes["token_embd.weight"][0]) if "token_embd.weight" in shapes else config.get("vocab_size")
    config["tie_word_embeddings"] = "output.weight" not in shapes
    config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    rope_dim = config.pop("qconvert_rope_dim", None)
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or not isinstance(config.get("hidden_size"), int) or heads < 1:
        return  # parse_config reports what is missing
    config.setdefault("num_key_value_heads", heads)
    head_dim = config.setdefault("head_dim", config["hidden_size"] // heads)
    if rope_dim is not None and rope_dim != head_dim:
        raise QConvertError(f"GGUF model rotates {rope_dim} of {head_dim} head dimensions; partial rotary embeddings are not supported")
    arch = kv.get("general.architecture")
    if isinstance(kv.get(f"{arch}.rope.scaling.type"), str) and kv[f"{arch}.rope.scaling.type"] not in ("", "none"):
        kind = kv[f"{arch}.rope.scaling.type"]
        scaling = {"rope_type": kind, "type": kind}
        if f"{arch}.rope.scaling.factor" in kv:
            scaling["factor"] = float(kv[f"{arch}.rope.scaling.factor"])
        config["rope_scaling"] = scaling


def _arch(name: str, model_types: tuple[str, ...], gguf_arch: str, permute: bool, hf_arch: str,
          reads: tuple[str, ...] = ()) -> Arch:
    return Arch(
        name=name, model_types=model_types, gguf_arch=gguf_arch, tensors=TENSORS, parse_config=parse_config,
        gguf_kv=GGUF_KV, hf_defaults={"architectures": [hf_arch], "hidden_act": "silu"},
        input_groups=input_groups, block=block, modules={"attn": attention, "mlp": mlp},
        gguf_permute_qk=permute, gguf_archs_read=reads, extra_gguf_kv=extra_gguf_kv,
        config_from_gguf_extra=config_from_gguf, rope_freqs=rope_freq_factors,
    )


# Mistral and Llama 3 are llama in llama.cpp (convert_hf_to_gguf's LlamaModel); Qwen2 is its own.
LLAMA = _arch("llama", ("llama", "mistral", "smollm"), "llama", True, "LlamaForCausalLM")
QWEN2 = _arch("qwen2", ("qwen2",), "qwen2", False, "Qwen2ForCausalLM")
