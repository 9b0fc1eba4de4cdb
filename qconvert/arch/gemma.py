"""Gemma 2 and Gemma 3 (text): the Llama block with Gemma's norms, GeGLU and soft-capping.

    x = embed(ids) * sqrt(hidden_size)            (the normalizer in the checkpoint's dtype, as HF)
    for each layer:
        x = x + post_attn_norm(o_proj(attention(rope(q), rope(k), v)))      (attention on norm(x))
        x = x + post_ffw_norm(down(gelu_tanh(gate(h)) * up(h)))            (h = pre_ffw_norm(x))
    logits = softcap(lm_head(norm(x)))            (lm_head = embed: tied)

Every RMSNorm multiplies by ``(1 + w)``, in float32; the attention scale is
``query_pre_attn_scalar ** -0.5``; layers alternate between sliding-window and global attention
(``layer_types``). Gemma 2 soft-caps the attention logits (``attn_logit_softcapping``) and the
final logits; Gemma 3 drops the attention soft-cap (transformers ignores the key), adds an
RMSNorm (also 1 + w) over each head of q and k before RoPE, and gives sliding layers their own
RoPE base and scaling (``rope_parameters["sliding_attention"]``; older configs
``rope_local_base_freq``, their ``rope_scaling`` applying to the global layers only).

llama.cpp (``gemma2`` / ``gemma3``; convert_hf_to_gguf.py's Gemma2Model / Gemma3Model):

* every ``*norm.weight`` is stored as ``1 + w`` (:attr:`Arch.gguf_value_offset`);
* the post-attention norm is ``post_attention_norm``, the pre-FFN norm ``ffn_norm``, the
  post-FFN norm ``post_ffw_norm`` (HF's ``post_attention_layernorm`` is *not* an FFN norm here);
* ``gemma2`` has no ``output`` tensor (always tied); ``gemma3`` may have one;
* the attention scale is not stored: llama.cpp uses ``1/sqrt(head_dim)``, or
  ``1/sqrt(hidden/heads)`` for the 27B sizes (46 layers for Gemma 2, 62 for Gemma 3) -- which is
  what every released checkpoint's ``query_pre_attn_scalar`` says. Export refuses a model whose
  scalar differs; import reconstructs it by the same rule;
* which layers slide: ``attention.sliding_window_pattern``, a period (default 2 for Gemma 2, 6 for
  Gemma 3: layer ``i`` slides when ``i % n < n - 1``) or one bool per layer. The converter writes
  none (released models follow the defaults); export writes the per-layer bools only when
  ``layer_types`` differs from llama.cpp's default, and import rebuilds ``layer_types`` from the
  key or the default. Gemma 3 without ``attention.sliding_window`` has no sliding layers;
* Gemma 2 always soft-caps (defaults 50 / 30 when the keys are absent), so export refuses a
  Gemma 2 without both caps; ``rope.freq_base_swa`` is the sliding layers' RoPE base (Gemma 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import QConvertError
from .base import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
                   Arch, Context, InputGroup, K, Layer, T, cfg_float, cfg_int, check_heads, rope_settings)
from .ops import ACTIVATIONS, attend, gated_mlp, qk_heads, rms_norm_offset, rope

QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
O_PROJ = "self_attn.o_proj.weight"
GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
DOWN = "mlp.down_proj.weight"
ATTN_NORM = "input_layernorm.weight"
ATTN_POST_NORM = "post_attention_layernorm.weight"
FFN_NORM = "pre_feedforward_layernorm.weight"
FFN_POST_NORM = "post_feedforward_layernorm.weight"
Q_NORM = "self_attn.q_norm.weight"
K_NORM = "self_attn.k_norm.weight"
NORM_OFFSET = 1.0  # Gemma's RMSNorm multiplies by (1 + w)

LAYER_TENSORS = (
    T("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "attn_norm"),
    T("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "attn_q"),
    T("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "attn_k"),
    T("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "attn_v"),
    T("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "attn_output"),
    T("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", "attn_post_norm"),
    T("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight", "ffn_norm"),
    T("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "ffn_gate"),
    T("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "ffn_up"),
    T("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "ffn_down"),
    T("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight", "ffn_post_norm"),
)
GEMMA2_TENSORS = (
    T("model.embed_tokens.weight", "token_embd.weight", "token_embd"),
    T("model.norm.weight", "output_norm.weight", "output_norm"),
    T("lm_head.weight", None, "output"),  # llama.cpp's gemma2 always ties the output to the embedding
) + LAYER_TENSORS
GEMMA3_TENSORS = (
    T("model.embed_tokens.weight", "token_embd.weight", "token_embd"),
    T("model.norm.weight", "output_norm.weight", "output_norm"),
    T("lm_head.weight", "output.weight", "output"),
    T("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", "attn_q_norm"),
    T("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", "attn_k_norm"),
) + LAYER_TENSORS
# llama.cpp stores every Gemma RMSNorm weight as 1 + w (convert_hf_to_gguf: name.endswith("norm.weight"))
NORM_ROLES = ("output_norm", "attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm", "attn_q_norm", "attn_k_norm")

_COMMON_KV = (
    K("context_length", "max_position_embeddings", "max_positions", "u32"),
    K("embedding_length", "hidden_size", "hidden_size", "u32"),
    K("block_count", "num_hidden_layers", "n_layers", "u32"),
    K("feed_forward_length", "intermediate_size", "intermediate_size", "u32"),
    K("attention.head_count", "num_attention_heads", "n_heads", "u32"),
    K("attention.head_count_kv", "num_key_value_heads", "n_kv_heads", "u32"),
    K("attention.key_length", "head_dim", "head_dim", "u32"),
    K("attention.value_length", "head_dim", "head_dim", "u32"),
    K("attention.layer_norm_rms_epsilon", "rms_norm_eps", "rms_eps", "f32"),
    K("vocab_size", "vocab_size", "vocab_size", "u32"),
)
# defaults: what llama.cpp assumes when a key is absent (src/models/gemma2.cpp, gemma3.cpp)
GEMMA2_KV = _COMMON_KV + (
    K("rope.freq_base", "rope_theta", "rope_theta", "f32", 10000.0),
    K("attention.sliding_window", "sliding_window", "gguf_sliding_window", "u32", 4096),
    K("attn_logit_softcapping", "attn_logit_softcapping", "attn_softcap", "f32", 50.0),
    K("final_logit_softcapping", "final_logit_softcapping", "final_softcap", "f32", 30.0),
)
GEMMA3_KV = _COMMON_KV + (
    K("rope.freq_base", "rope_parameters.full_attention.rope_theta", "rope_theta", "f32", 10000.0),
    K("rope.freq_base_swa", "rope_parameters.sliding_attention.rope_theta", "gguf_rope_theta_swa", "f32", 10000.0),
    K("attention.sliding_window", "sliding_window", "gguf_sliding_window", "u32"),
    K("final_logit_softcapping", "final_logit_softcapping", "final_softcap", "f32"),
)
# llama.cpp's default sliding-window period and the layer count of its "27B" type (whose
# attention scale is 1/sqrt(hidden/heads) instead of 1/sqrt(head_dim))
_LLAMA_CPP = {"gemma2": (2, 46), "gemma3": (6, 62)}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh")


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str  # "gemma2" | "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    max_positions: int
    layer_types: tuple[str, ...]  # "sliding_attention" | "full_attention" per layer
    windows: tuple[int | None, ...]  # per layer: sliding window or None (global attention)
    sliding_window: int | None
    query_pre_attn_scalar: float
    attn_softcap: float | None  # Gemma 2 only
    final_softcap: float | None
    rope_theta: float  # global layers
    rope_scaling: dict | None
    rope_theta_local: float  # sliding layers
    rope_scaling_local: dict | None
    qk_norm: bool  # Gemma 3
    tie_embeddings: bool
    embed_scale: float  # sqrt(hidden_size), rounded to the checkpoint's dtype as transformers does
    norm_offset: float = NORM_OFFSET

    @property
    def is_gemma3(self) -> bool:
        return self.qk_norm

    @property
    def gguf_sliding_window(self) -> int | None:
        """The window written to GGUF: only when some layer slides (Gemma 3 without the key
        runs every layer globally in llama.cpp)."""
        return self.sliding_window if any(w for w in self.windows) else None

    @property
    def gguf_rope_theta_swa(self) -> float | None:
        return self.rope_theta_local if self.gguf_sliding_window is not None else None


def _text_config(cfg: dict) -> dict:
    if cfg.get("model_type") == "gemma3":
        raise QConvertError(
            "this is a Gemma 3 multimodal checkpoint (model_type gemma3, Gemma3ForConditionalGeneration); "
            "qconvert converts Gemma 3 text models (model_type gemma3_text, Gemma3ForCausalLM) only"
        )
    return cfg


def parse_config(cfg: dict, gemma3: bool = False) -> GemmaConfig:
    """Validated hyper-parameters; one clear error for anything missing or absurd."""
    if not isinstance(cfg, dict):
        raise QConvertError("model.config is not a JSON object")
    cfg = _text_config(cfg)
    what = " Gemma 3 model" if gemma3 else " Gemma 2 model"
    hidden = cfg_int(cfg, "hidden_size", hi=MAX_HIDDEN, what=what)
    n_heads = cfg_int(cfg, "num_attention_heads", hi=MAX_HEADS, what=what)
    n_kv = cfg_int(cfg, "num_key_value_heads", cfg.get("num_attention_heads"), hi=MAX_HEADS, what=what)
    explicit = cfg.get("head_dim") is not None
    head_dim = cfg_int(cfg, "head_dim", hidden // n_heads if hidden >= n_heads else 0, hi=MAX_HEAD_DIM, what=what)
    check_heads(hidden, n_heads, n_kv, head_dim, explicit)
    n_layers = cfg_int(cfg, "num_hidden_layers", hi=MAX_LAYERS, what=what)
    model_type = "gemma3_text" if gemma3 else "gemma2"

    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        raise QConvertError(f"hidden_activation {act!r} is not supported for {model_type} ({', '.join(_GELU_TANH)})")
    if cfg.get("attention_bias"):
        raise QConvertError(f"attention biases (attention_bias) are not supported for {model_type}")
    if cfg.get("use_bidirectional_attention"):
        raise QConvertError("use_bidirectional_attention (an embedding model) is not supported; qconvert runs causal decoders")

    layer_types = _layer_types(cfg, n_layers, gemma3)
    window = cfg.get("sliding_window", 4096)
    if window is not None:
        window = cfg_int({"sliding_window": window}, "sliding_window", hi=MAX_POSITIONS)
    if "sliding_attention" in layer_types and window is None:
        raise QConvertError("layer_types has sliding_attention layers but sliding_window is not set")
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)

    if gemma3:
        (theta, scaling), (theta_local, scaling_local) = _gemma3_rope(cfg)
        attn_softcap = None  # transformers' Gemma3Attention never passes it on
        final_softcap = _softcap(cfg, "final_logit_softcapping", None)
    else:
        theta, scaling = rope_settings(cfg)
        theta_local, scaling_local = theta, scaling
        attn_softcap = _softcap(cfg, "attn_logit_softcapping", 50.0)
        final_softcap = _softcap(cfg, "final_logit_softcapping", 30.0)

    return GemmaConfig(
        model_type=model_type,
        vocab_size=cfg_int(cfg, "vocab_size", hi=MAX_VOCAB, what=what),
        hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", hi=MAX_INTERMEDIATE, what=what),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rms_eps=cfg_float(cfg, "rms_norm_eps", 1e-6),
        max_positions=cfg_int(cfg, "max_position_embeddings", 131072 if gemma3 else 8192, hi=MAX_POSITIONS),
        layer_types=layer_types,
        windows=windows,
        sliding_window=window,
        query_pre_attn_scalar=cfg_float(cfg, "query_pre_attn_scalar", 256),
        attn_softcap=attn_softcap,
        final_softcap=final_softcap,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_theta_local=theta_local,
        rope_scaling_local=scaling_local,
        qk_norm=gemma3,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        embed_scale=_embed_scale(hidden, cfg),
    )


def _layer_types(cfg: dict, n_layers: int, gemma3: bool) -> tuple[str, ...]:
    """``layer_types`` (transformers 5), else transformers' default: Gemma 2 alternates (even
    layers slide), Gemma 3 slides except every ``sliding_window_pattern``-th layer (default 6)."""
    types = cfg.get("layer_types")
    if types is not None:
        if not (isinstance(types, list) and len(types) == n_layers
                and all(t in ("full_attention", "sliding_attention") for t in types)):
            raise QConvertError(f"config.json layer_types must list {n_layers} of full_attention/sliding_attention")
        return tuple(types)
    period = 2
    if gemma3:
        key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
        period = cfg_int(cfg, key, 6, hi=MAX_LAYERS)
    return tuple("sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers))


def _softcap(cfg: dict, key: str, default: float | None) -> float | None:
    """A soft-cap: absent -> transformers' default; null -> none; else a positive number."""
    value = cfg.get(key, default)
    return None if value is None else cfg_float({key: value}, key)


def _gemma3_rope(cfg: dict) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((theta, scaling) of global layers, of sliding layers), as Gemma3TextConfig builds them:
    ``rope_parameters`` per layer type, a legacy ``rope_scaling`` for the global layers only,
    defaults ``rope_theta`` (1e6) and ``rope_local_base_freq`` (1e4)."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise QConvertError(f"config.json rope_parameters is {params!r}, not an object")
    out = []
    for layer_type, legacy_key, default in (("full_attention", "rope_theta", 1e6),
                                            ("sliding_attention", "rope_local_base_freq", 1e4)):
        p = params.get(layer_type)
        if p is None:
            p = {"rope_type": "default"}
        if not isinstance(p, dict):
            raise QConvertError(f"config.json rope_parameters[{layer_type!r}] is {p!r}, not an object")
        p = dict(p)
        if layer_type == "full_attention" and isinstance(cfg.get("rope_scaling"), dict):
            p.update(cfg["rope_scaling"])
        if p.get("rope_theta") is None:
            p["rope_theta"] = cfg.get(legacy_key) if cfg.get(legacy_key) is not None else default
        out.append(rope_settings({"rope_parameters": p}))
    return out[0], out[1]


def _embed_scale(hidden: int, cfg: dict) -> float:
    """sqrt(hidden_size) as transformers multiplies it: a float32 scalar cast to the weights'
    dtype (the checkpoint's ``dtype`` / ``torch_dtype``): 55.4256 -> 55.5 in bfloat16."""
    scale = np.float32(hidden ** 0.5)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype == "bfloat16":
        from ..blocks.floats import f32_to_bf16_bits

        bits = f32_to_bf16_bits(np.array([scale], np.float32)).astype(np.uint32) << np.uint32(16)
        scale = bits.view(np.float32)[0]
    elif dtype == "float16":
        scale = np.float32(np.float16(scale))
    return float(scale)


# --------------------------------------------------------------------------------------------
# the block


def _norm(layer: Layer, name: str, x: np.ndarray, eps: float) -> np.ndarray:
    return rms_norm_offset(x, layer.vector(name), eps, NORM_OFFSET)


def attention(cfg: GemmaConfig, layer: Layer, h: np.ndarray, ctx: Context) -> np.ndarray:
    """h (B, T, H) -> o_proj(attention) (B, T, H), before the post-attention norm."""
    i = layer.index
    q, k, v = qk_heads(layer, h, QKV, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = _norm(layer, Q_NORM, q, cfg.rms_eps)
        k = _norm(layer, K_NORM, k, cfg.rms_eps)
    if cfg.layer_types[i] == "sliding_attention":
        cos, sin = ctx.rope(cfg.head_dim, cfg.rope_theta_local, cfg.rope_scaling_local)
    else:
        cos, sin = ctx.rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k = rope(q, k, cos, sin)
    att = attend(q, k, v, ctx, i, float(cfg.query_pre_attn_scalar) ** -0.5, window=cfg.windows[i],
                 softcap=cfg.attn_softcap)
    return layer.linears((O_PROJ,), att)[0]


def mlp(cfg: GemmaConfig, layer: Layer, h: np.ndarray, ctx: Context | None = None) -> np.ndarray:
    """GeGLU (tanh GELU), before the post-feed-forward norm."""
    return gated_mlp(layer, h, ACTIVATIONS["gelu_pytorch_tanh"])


def block(cfg: GemmaConfig, layer: Layer, x: np.ndarray, ctx: Context) -> np.ndarray:
    eps = cfg.rms_eps
    a = attention(cfg, layer, _norm(layer, ATTN_NORM, x, eps), ctx)
    x = x + _norm(layer, ATTN_POST_NORM, a, eps)
    m = mlp(cfg, layer, _norm(layer, FFN_NORM, x, eps))
    return x + _norm(layer, FFN_POST_NORM, m, eps)


def input_groups(cfg: GemmaConfig, i: int) -> list[InputGroup]:
    """input norm (1 + w) -> q,k,v; v -> o (no grouped-query attention only); pre-FFN norm
    (1 + w) -> gate,up; up -> down. The post norms read linear outputs: nothing to fold."""
    groups = [InputGroup(ATTN_NORM, QKV, module="attn", norm_offset=NORM_OFFSET)]
    if cfg.n_kv_heads == cfg.n_heads:
        groups.append(InputGroup(QKV[2], (O_PROJ,), prev_kind="linear"))
    groups += [InputGroup(FFN_NORM, GATE_UP, module="mlp", norm_offset=NORM_OFFSET),
               InputGroup(GATE_UP[1], (DOWN,), prev_kind="linear")]
    return groups


# --------------------------------------------------------------------------------------------
# GGUF


def _llama_cpp_swa(gguf_arch: str, n_layers: int, pattern) -> list[bool]:
    """Which layers llama.cpp runs with the sliding window (llama_hparams::set_swa_pattern, not
    dense-first): a bool per layer, or a period ``n`` -- layer ``i`` slides when
    ``i % n < n - 1`` (``n == 0``: every layer)."""
    if pattern is None:
        pattern = _LLAMA_CPP[gguf_arch][0]
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(p, bool) for p in pattern):
            raise QConvertError(f"GGUF {gguf_arch}.attention.sliding_window_pattern must hold {n_layers} booleans")
        return list(pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise QConvertError(f"GGUF {gguf_arch}.attention.sliding_window_pattern is {pattern!r}, not a period or booleans")
    return [pattern == 0 or (i % pattern < pattern - 1) for i in range(n_layers)]


def _llama_cpp_scalar(gguf_arch: str, n_layers: int, hidden: int, n_heads: int, head_dim: int) -> float:
    """The query_pre_attn_scalar llama.cpp's attention scale amounts to (it does not read one)."""
    return float(hidden // n_heads) if n_layers == _LLAMA_CPP[gguf_arch][1] else float(head_dim)


def _extra_gguf_kv(gguf_arch: str, cfg: GemmaConfig, config: dict) -> list:
    """The sliding pattern (when not llama.cpp's default) and RoPE scaling; refuses what
    llama.cpp's graph would compute differently."""
    expected = _llama_cpp_scalar(gguf_arch, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.head_dim)
    if cfg.query_pre_attn_scalar != expected:
        raise QConvertError(
            f"query_pre_attn_scalar is {cfg.query_pre_attn_scalar:g}, but llama.cpp's {gguf_arch} scales attention by "
            f"1/sqrt({expected:g}) for this model (it stores no scale); the GGUF would compute something else"
        )
    if gguf_arch == "gemma2" and (cfg.attn_softcap is None or cfg.final_softcap is None):
        raise QConvertError("llama.cpp's gemma2 always soft-caps the attention and final logits; this model "
                            "has attn_logit_softcapping or final_logit_softcapping null")
    out = []
    sliding = [w is not None for w in cfg.windows]
    if gguf_arch == "gemma2" or any(sliding):
        if sliding != _llama_cpp_swa(gguf_arch, cfg.n_layers, None):
            out.append(("attention.sliding_window_pattern", "bool[]", sliding))
    if gguf_arch == "gemma3" and any(sliding) and cfg.rope_scaling_local is not None:
        raise QConvertError("llama.cpp's gemma3 applies no RoPE scaling to sliding-window layers; this model scales them")
    if gguf_arch == "gemma2" and cfg.rope_scaling_local != cfg.rope_scaling:
        raise QConvertError("llama.cpp's gemma2 uses one RoPE for every layer")
    s = cfg.rope_scaling
    if s is not None:
        kind = s.get("rope_type", s.get("type"))
        if kind != "linear":
            raise QConvertError(f"RoPE scaling {kind!r} has no llama.cpp {gguf_arch} equivalent (linear only)")
        out += [("rope.scaling.type", "str", "linear"), ("rope.scaling.factor", "f32", float(s["factor"]))]
    return out


def _config_from_gguf(gguf_arch: str, kv: dict, shapes: dict, config: dict) -> None:
    """Completes a config read from GGUF: vocabulary and tying from the tensors, layer_types
    from llama.cpp's sliding pattern, the attention scalar llama.cpp uses, RoPE scaling."""
    if "token_embd.weight" in shapes:
        config["vocab_size"] = int(shapes["token_embd.weight"][0])
    config["tie_word_embeddings"] = "output.weight" not in shapes
    n_layers = config.get("num_hidden_layers")
    hidden, n_heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not all(isinstance(v, int) and v > 0 for v in (n_layers, hidden, n_heads)):
        return  # the generic checks report the missing key
    n_layers = min(n_layers, MAX_LAYERS + 1)  # parse_config reports an absurd count
    head_dim = config.get("head_dim") or hidden // n_heads
    config.setdefault("head_dim", head_dim)
    prefix = f"{gguf_arch}."
    if gguf_arch == "gemma3" and not config.get("sliding_window"):
        config.pop("sliding_window", None)
        sliding = [False] * n_layers
    else:
        sliding = _llama_cpp_swa(gguf_arch, n_layers, kv.get(prefix + "attention.sliding_window_pattern"))
    config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    config["query_pre_attn_scalar"] = _llama_cpp_scalar(gguf_arch, n_layers, hidden, n_heads, head_dim)
    factor = kv.get(prefix + "rope.scaling.factor")
    kind = kv.get(prefix + "rope.scaling.type", "linear")
    scaling = None
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor not in (0, 1):
        if kind != "linear":
            raise QConvertError(f"GGUF RoPE scaling {kind!r} is not supported for {gguf_arch} (linear)")
        scaling = {"rope_type": "linear", "factor": float(factor)}
    if gguf_arch == "gemma2":
        base_swa = kv.get(prefix + "rope.freq_base_swa")
        if base_swa is not None and base_swa != config.get("rope_theta", 10000.0):
            raise QConvertError("GGUF gemma2 model has a separate RoPE base for sliding layers; transformers' Gemma 2 has one")
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta", 10000.0),
                                     **(scaling or {})}
    else:
        rope = config.setdefault("rope_parameters", {})
        rope.setdefault("full_attention", {"rope_theta": 10000.0})["rope_type"] = "default"
        rope["full_attention"].update(scaling or {})
        rope.setdefault("sliding_attention", {"rope_theta": 10000.0})["rope_type"] = "default"
        config["attn_logit_softcapping"] = None
        config.setdefault("final_logit_softcapping", None)


def _arch(name: str, gemma3: bool) -> Arch:
    return Arch(
        name=name,
        model_types=("gemma3_text", "gemma3") if gemma3 else ("gemma2",),
        gguf_arch=name,
        tensors=GEMMA3_TENSORS if gemma3 else GEMMA2_TENSORS,
        parse_config=partial(parse_config, gemma3=gemma3),
        gguf_kv=GEMMA3_KV if gemma3 else GEMMA2_KV,
        hf_defaults={"architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
                     "hidden_activation": "gelu_pytorch_tanh"},
        input_groups=input_groups,
        block=block,
        modules={"attn": attention, "mlp": mlp},
        extra_gguf_kv=partial(_extra_gguf_kv, name),
        config_from_gguf_extra=partial(_config_from_gguf, name),
        gguf_value_offset={role: NORM_OFFSET for role in NORM_ROLES},
    )


GEMMA2 = _arch("gemma2", gemma3=False)
GEMMA3 = _arch("gemma3", gemma3=True)
