"""The Llama family (Llama, Mistral, Qwen2, SmolLM): one file, top to bottom like the paper.

    x = embed(ids)
    for each layer:
        x = x + o_proj(attention(rope(q_proj(rmsnorm(x))), rope(k_proj(.)), v_proj(.)))
        x = x + down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))
    logits = lm_head(rmsnorm(x))            # lm_head = embed when tied

Grouped-query attention, rotate-half RoPE (the container's convention, FORMAT.md §9), a
pre-allocated KV cache. Every matrix product runs on the packed blocks (``kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QConvertError
from .ops import apply_rope, rms_norm, rope_tables, silu, softmax
from .weights import Weights


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    rope_scaling: dict | None
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        try:
            n_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = cfg.get("rope_parameters") or {}
            scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or hidden // n_heads),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                max_positions=int(cfg.get("max_position_embeddings", 2048)),
                rope_scaling=scaling,
                attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise QConvertError(f"model.config lacks or mangles a Llama hyper-parameter ({e})") from None


class KVCache:
    def __init__(self, cfg: LlamaConfig, max_tokens: int) -> None:
        shape = (cfg.n_layers, cfg.n_kv_heads, max_tokens, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.length = 0
        self.capacity = max_tokens


class Llama:
    def __init__(self, weights: Weights, config: dict) -> None:
        cfg = self.cfg = LlamaConfig.from_hf(config)
        if config.get("qconvert_rope_freq_factors"):
            raise QConvertError("this model uses per-frequency RoPE factors, which the runtime does not apply yet")
        w = weights
        self.embed = w.embedding("model.embed_tokens.weight")
        self.norm = w.vector("model.norm.weight")
        self.lm_head = w.linear("lm_head.weight") if w.has("lm_head.weight") else self.embed.as_linear()
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(
                dict(
                    attn_norm=w.vector(p + "input_layernorm.weight"),
                    q=w.linear(a + "q_proj.weight", a + "q_proj.bias"),
                    k=w.linear(a + "k_proj.weight", a + "k_proj.bias"),
                    v=w.linear(a + "v_proj.weight", a + "v_proj.bias"),
                    o=w.linear(a + "o_proj.weight", a + "o_proj.bias"),
                    mlp_norm=w.vector(p + "post_attention_layernorm.weight"),
                    gate=w.linear(p + "mlp.gate_proj.weight"),
                    up=w.linear(p + "mlp.up_proj.weight"),
                    down=w.linear(p + "mlp.down_proj.weight"),
                )
            )

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.cfg, max_tokens or self.cfg.max_positions)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Run ``ids`` (T,) after what ``cache`` holds; logits (T, vocab), or (1, vocab) for the last."""
        cfg = self.cfg
        ids = np.asarray(ids, dtype=np.int64)
        T, pos0 = len(ids), cache.length
        if pos0 + T > cache.capacity:
            raise QConvertError(f"context of {cache.capacity} tokens exceeded")
        S = pos0 + T
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        group = nh // nkv
        cos, sin = rope_tables(np.arange(pos0, S), hd, cfg.rope_theta, cfg.rope_scaling)
        # causal mask: query t (absolute pos0 + t) sees keys 0 .. pos0 + t
        mask = np.where(np.arange(S)[None, :] > (pos0 + np.arange(T))[:, None], -np.inf, 0.0).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(hd))

        x = self.embed(ids)  # (T, H)
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L["attn_norm"], cfg.rms_eps)
            q = L["q"](h).reshape(T, nh, hd).transpose(1, 0, 2)  # (nh, T, hd)
            k = L["k"](h).reshape(T, nkv, hd).transpose(1, 0, 2)  # (nkv, T, hd)
            v = L["v"](h).reshape(T, nkv, hd).transpose(1, 0, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.k[i, :, pos0:S] = k
            cache.v[i, :, pos0:S] = v
            K, V = cache.k[i, :, :S], cache.v[i, :, :S]  # (nkv, S, hd)
            qg = q.reshape(nkv, group * T, hd)
            scores = (qg @ K.transpose(0, 2, 1)).reshape(nkv, group, T, S) * scale + mask
            att = softmax(scores, axis=-1).reshape(nkv, group * T, S) @ V  # (nkv, group*T, hd)
            att = att.reshape(nh, T, hd).transpose(1, 0, 2).reshape(T, nh * hd)
            x = x + L["o"](att)
            h = rms_norm(x, L["mlp_norm"], cfg.rms_eps)
            x = x + L["down"](silu(L["gate"](h)) * L["up"](h))
        cache.length = S
        x = rms_norm(x if all_logits else x[-1:], self.norm, cfg.rms_eps)
        return self.lm_head(x)
