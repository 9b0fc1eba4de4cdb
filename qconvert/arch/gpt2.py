"""GPT-2: learned positions, pre-LayerNorm blocks, fused qkv, GELU (tanh), tied output.

    x = wte(ids) + wpe(positions)
    for each block:
        q, k, v = split(c_attn(ln_1(x)))
        x = x + c_proj(attention(q, k, v))
        x = x + mlp.c_proj(gelu(c_fc(ln_2(x))))
    logits = wte^T ln_f(x)

The container stores Conv1D weights as (out, in) (FORMAT.md §9), so c_attn is an ordinary
Linear here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import QConvertError
from ..runtime.ops import gelu_erf, gelu_tanh, layer_norm, softmax
from ..runtime.weights import Weights
from .base import MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Arch, T, cfg_float, cfg_int

# GPT2LMHeadModel names carry "transformer."; GPT2Model's do not (Arch.hf_prefixes).
TENSORS = (
    T("wte.weight", "token_embd.weight", "token_embd"),
    T("wpe.weight", "position_embd.weight", "pos_embd"),
    T("ln_f.weight", "output_norm.weight", "output_norm"),
    T("ln_f.bias", "output_norm.bias", "output_norm_bias"),
    T("lm_head.weight", "output.weight", "output"),
    T("h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", "attn_norm"),
    T("h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias", "attn_norm_bias"),
    T("h.{i}.attn.c_attn.weight", "blk.{i}.attn_qkv.weight", "attn_qkv"),
    T("h.{i}.attn.c_attn.bias", "blk.{i}.attn_qkv.bias", "attn_qkv_bias"),
    T("h.{i}.attn.c_proj.weight", "blk.{i}.attn_output.weight", "attn_output"),
    T("h.{i}.attn.c_proj.bias", "blk.{i}.attn_output.bias", "attn_output_bias"),
    T("h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight", "ffn_norm"),
    T("h.{i}.ln_2.bias", "blk.{i}.ffn_norm.bias", "ffn_norm_bias"),
    T("h.{i}.mlp.c_fc.weight", "blk.{i}.ffn_up.weight", "ffn_up"),
    T("h.{i}.mlp.c_fc.bias", "blk.{i}.ffn_up.bias", "ffn_up_bias"),
    T("h.{i}.mlp.c_proj.weight", "blk.{i}.ffn_down.weight", "ffn_down"),
    T("h.{i}.mlp.c_proj.bias", "blk.{i}.ffn_down.bias", "ffn_down_bias"),
)
# HF GPT-2 stores these Conv1D weights (in, out); the container stores (out, in) like every Linear.
CONV1D = re.compile(r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# causal-mask buffers of old GPT-2 checkpoints, not weights
BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$")

_ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": gelu_erf}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    max_positions: int
    eps: float
    activation: str

    @property
    def n_layers(self) -> int:
        return self.n_layer

    @property
    def n_heads(self) -> int:
        return self.n_head

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPT2Config":
        act = cfg.get("activation_function", "gelu_new")
        if act not in _ACTIVATIONS:
            raise QConvertError(f"GPT-2 activation {act!r} is not supported by the runtime")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise QConvertError("GPT-2 variants with per-layer attention scaling are not supported by the runtime")
        n_embd, n_head = cfg_int(cfg, "n_embd", hi=MAX_HIDDEN), cfg_int(cfg, "n_head", hi=MAX_HEADS)
        if n_embd % n_head:
            raise QConvertError(f"n_head {n_head} does not divide n_embd {n_embd}")
        return cls(
            vocab_size=cfg_int(cfg, "vocab_size", hi=MAX_VOCAB),
            n_embd=n_embd,
            n_layer=cfg_int(cfg, "n_layer", hi=MAX_LAYERS),
            n_head=n_head,
            max_positions=cfg_int(cfg, "n_positions", 1024, hi=MAX_POSITIONS),
            eps=cfg_float(cfg, "layer_norm_epsilon", 1e-5),
            activation=act,
        )


class KVCache:
    def __init__(self, cfg: GPT2Config, max_tokens: int) -> None:
        hd = cfg.n_embd // cfg.n_head
        self.k = np.zeros((cfg.n_layer, cfg.n_head, max_tokens, hd), np.float32)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.capacity = max_tokens


class GPT2:
    def __init__(self, weights: Weights, config: dict) -> None:
        cfg = self.cfg = GPT2Config.from_hf(config)
        if not config.get("qconvert_conv1d_transposed"):
            raise QConvertError("this GPT-2 container predates the (out, in) weight layout; re-convert it")
        w = weights
        self.act = _ACTIVATIONS[cfg.activation]
        self.wte = w.embedding("wte.weight")
        self.wpe = w.matrix("wpe.weight")
        self.ln_f = (w.vector("ln_f.weight"), w.vector("ln_f.bias"))
        self.lm_head = w.linear("lm_head.weight") if w.has("lm_head.weight") else self.wte.as_linear()
        self.blocks = []
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            self.blocks.append(
                dict(
                    ln_1=(w.vector(p + "ln_1.weight"), w.vector(p + "ln_1.bias")),
                    qkv=w.linear(p + "attn.c_attn.weight", p + "attn.c_attn.bias"),
                    proj=w.linear(p + "attn.c_proj.weight", p + "attn.c_proj.bias"),
                    ln_2=(w.vector(p + "ln_2.weight"), w.vector(p + "ln_2.bias")),
                    fc=w.linear(p + "mlp.c_fc.weight", p + "mlp.c_fc.bias"),
                    fc_proj=w.linear(p + "mlp.c_proj.weight", p + "mlp.c_proj.bias"),
                )
            )

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.cfg, max_tokens or self.cfg.max_positions)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        cfg = self.cfg
        ids = np.asarray(ids, dtype=np.int64)
        T, pos0 = len(ids), cache.length
        S = pos0 + T
        if S > cache.capacity:
            raise QConvertError(f"context of {cache.capacity} tokens exceeded")
        nh, hd = cfg.n_head, cfg.n_embd // cfg.n_head
        mask = np.where(np.arange(S)[None, :] > (pos0 + np.arange(T))[:, None], -np.inf, 0.0).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(hd))
        x = self.wte(ids) + self.wpe[pos0:S]  # (T, E)
        for i, B in enumerate(self.blocks):
            h = layer_norm(x, *B["ln_1"], cfg.eps)
            qkv = B["qkv"](h).reshape(T, 3, nh, hd).transpose(1, 2, 0, 3)  # (3, nh, T, hd)
            cache.k[i, :, pos0:S] = qkv[1]
            cache.v[i, :, pos0:S] = qkv[2]
            scores = qkv[0] @ cache.k[i, :, :S].transpose(0, 2, 1) * scale + mask  # (nh, T, S)
            att = (softmax(scores) @ cache.v[i, :, :S]).transpose(1, 0, 2).reshape(T, cfg.n_embd)
            x = x + B["proj"](att)
            h = layer_norm(x, *B["ln_2"], cfg.eps)
            x = x + B["fc_proj"](self.act(B["fc"](h)))
        cache.length = S
        x = layer_norm(x if all_logits else x[-1:], *self.ln_f, cfg.eps)
        return self.lm_head(x)


def _runtime(weights: Weights, config: dict) -> GPT2:
    return GPT2(Weights(weights.c, prefixes=("transformer.", "")), config)


ARCH = Arch(name="gpt2", model_types=("gpt2",), gguf_arch="gpt2", tensors=TENSORS, parse_config=GPT2Config.from_hf,
            kind="custom", runtime=_runtime, hf_prefixes=("transformer.", ""), layer_prefix="h.{i}.",
            hf_transposed=CONV1D, hf_skip=BUFFERS)
