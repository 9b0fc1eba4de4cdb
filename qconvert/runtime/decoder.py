"""A decoder-only language model run on the packed blocks, for any architecture in ``arch/``.

    x = embed(ids) (* the family's embedding scale)
    for each layer:  x = arch.block(cfg, layer, x, ctx)      # the family's own forward
    logits = lm_head(final_norm(x)) (soft-capped where the family does)

The family file supplies the block; this file supplies the weights as packed linears
(:class:`PackedLayer`), the KV cache and the embedding / output ends.
"""

from __future__ import annotations

import numpy as np

from ..arch import Arch, Context, KVCache
from ..arch.ops import rms_norm_offset
from ..errors import QConvertError
from .weights import Weights


class PackedLayer:
    """One layer's weights as the block sees them: float vectors, and linears on packed blocks
    (a bias ``….bias`` beside a weight ``….weight`` is added when present)."""

    def __init__(self, weights: Weights, prefix: str, index: int) -> None:
        self.w, self.prefix, self.index = weights, prefix, index
        self._vectors: dict[str, np.ndarray] = {}
        self._linears: dict = {}

    def has(self, name: str) -> bool:
        return self.w.has(self.prefix + name)

    def vector(self, name: str) -> np.ndarray:
        v = self._vectors.get(name)
        if v is None:
            v = self._vectors[name] = self.w.vector(self.prefix + name)
        return v

    def linear(self, name: str):
        lin = self._linears.get(name)
        if lin is None:
            full = self.prefix + name
            bias = full[: -len("weight")] + "bias" if full.endswith(".weight") else None
            lin = self._linears[name] = self.w.linear(full, bias)
        return lin

    def linears(self, names: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        return [(y := self.linear(n)(x2)).reshape(*lead, y.shape[-1]) for n in names]


class Decoder:
    def __init__(self, arch: Arch, weights: Weights, config: dict) -> None:
        self.arch = arch
        cfg = self.cfg = arch.parse_config(config)
        names = list(weights.c.tensors)
        roles: dict[str, str] = {}
        for n in names:
            roles.setdefault(arch.role(n), n)
        if "token_embd" not in roles:
            raise QConvertError(f"the container lacks the token embedding this {arch.name} model needs")
        self.embed = weights.embedding(roles["token_embd"])
        if "output_norm" not in roles:
            raise QConvertError(f"the container lacks the final norm this {arch.name} model needs")
        self.norm = weights.vector(roles["output_norm"])
        out = arch.output_name(names, config)
        if out is None:
            raise QConvertError("the container has no output projection and its embeddings are not tied")
        self.lm_head = weights.linear(out) if out != roles["token_embd"] else self.embed.as_linear()
        if self.embed.shape[1] != cfg.hidden_size or self.norm.shape != (cfg.hidden_size,):
            raise QConvertError(f"the embedding or final norm does not match hidden_size {cfg.hidden_size}")
        self.layers = [PackedLayer(weights, arch.layer_name(i, ""), i) for i in range(cfg.n_layers)]
        self.embed_scale = getattr(cfg, "embed_scale", None)
        self.norm_offset = getattr(cfg, "norm_offset", 0.0)
        self.final_softcap = getattr(cfg, "final_softcap", None)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    def new_cache(self, max_tokens: int | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_tokens or cfg.max_positions)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Run ``ids`` (T,) after what ``cache`` holds; logits (T, vocab), or (1, vocab) for the last."""
        ids = np.asarray(ids, dtype=np.int64)
        T, pos0 = len(ids), cache.length
        if pos0 + T > cache.capacity:
            raise QConvertError(f"context of {cache.capacity} tokens exceeded")
        ctx = Context(T, pos0, cache)
        x = self.embed(ids)[None]  # (1, T, H)
        if self.embed_scale is not None:
            x = x * np.float32(self.embed_scale)
        for layer in self.layers:
            x = self.arch.block(self.cfg, layer, x, ctx)
        cache.length = ctx.S
        x = x[0] if all_logits else x[0, -1:]
        logits = self.lm_head(rms_norm_offset(x, self.norm, self.cfg.rms_eps, self.norm_offset))
        if self.final_softcap:
            cap = np.float32(self.final_softcap)
            logits = np.tanh(logits / cap) * cap
        return logits
