"""BERT encoder (e.g. all-MiniLM-L6-v2): post-LayerNorm blocks, exact GELU, mean pooling.

    x = LN(word(ids) + position(0..T-1) + token_type(0))
    for each layer:
        x = LN(x + dense(attention(query(x), key(x), value(x))))
        x = LN(x + output(gelu(intermediate(x))))
    embedding = mean over tokens of x    (sentence-transformers' mean pooling)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QConvertError
from ..runtime.ops import gelu_erf, gelu_tanh, layer_norm, softmax
from ..runtime.weights import Weights
from .base import MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_POSITIONS, Arch, T, cfg_float, cfg_int

# BertModel names; BertFor* checkpoints prefix them with "bert." (Arch.hf_prefixes).
_A = "encoder.layer.{i}.attention."
TENSORS = (
    T("embeddings.word_embeddings.weight", "token_embd.weight", "token_embd"),
    T("embeddings.position_embeddings.weight", "position_embd.weight", "pos_embd"),
    T("embeddings.token_type_embeddings.weight", "token_types.weight", "token_types"),
    T("embeddings.LayerNorm.weight", "token_embd_norm.weight", "token_embd_norm"),
    T("embeddings.LayerNorm.bias", "token_embd_norm.bias", "token_embd_norm_bias"),
    T(_A + "self.query.weight", "blk.{i}.attn_q.weight", "attn_q"),
    T(_A + "self.query.bias", "blk.{i}.attn_q.bias", "attn_q_bias"),
    T(_A + "self.key.weight", "blk.{i}.attn_k.weight", "attn_k"),
    T(_A + "self.key.bias", "blk.{i}.attn_k.bias", "attn_k_bias"),
    T(_A + "self.value.weight", "blk.{i}.attn_v.weight", "attn_v"),
    T(_A + "self.value.bias", "blk.{i}.attn_v.bias", "attn_v_bias"),
    T(_A + "output.dense.weight", "blk.{i}.attn_output.weight", "attn_output"),
    T(_A + "output.dense.bias", "blk.{i}.attn_output.bias", "attn_output_bias"),
    T(_A + "output.LayerNorm.weight", "blk.{i}.attn_output_norm.weight", "attn_output_norm"),
    T(_A + "output.LayerNorm.bias", "blk.{i}.attn_output_norm.bias", "attn_output_norm_bias"),
    T("encoder.layer.{i}.intermediate.dense.weight", "blk.{i}.ffn_up.weight", "ffn_up"),
    T("encoder.layer.{i}.intermediate.dense.bias", "blk.{i}.ffn_up.bias", "ffn_up_bias"),
    T("encoder.layer.{i}.output.dense.weight", "blk.{i}.ffn_down.weight", "ffn_down"),
    T("encoder.layer.{i}.output.dense.bias", "blk.{i}.ffn_down.bias", "ffn_down_bias"),
    T("encoder.layer.{i}.output.LayerNorm.weight", "blk.{i}.layer_output_norm.weight", "layer_output_norm"),
    T("encoder.layer.{i}.output.LayerNorm.bias", "blk.{i}.layer_output_norm.bias", "layer_output_norm_bias"),
    T("pooler.dense.weight", None, "pooler"),
    T("pooler.dense.bias", None, "pooler_bias"),
)

_ACTIVATIONS = {"gelu": gelu_erf, "gelu_new": gelu_tanh}


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    n_layers: int
    n_heads: int
    max_positions: int
    eps: float
    activation: str

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise QConvertError(f"BERT activation {act!r} is not supported by the runtime")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise QConvertError("only absolute position embeddings are supported for BERT")
        hidden, n_heads = cfg_int(cfg, "hidden_size", hi=MAX_HIDDEN), cfg_int(cfg, "num_attention_heads", hi=MAX_HEADS)
        if hidden % n_heads:
            raise QConvertError(f"num_attention_heads {n_heads} does not divide hidden_size {hidden}")
        return cls(
            hidden_size=hidden,
            n_layers=cfg_int(cfg, "num_hidden_layers", hi=MAX_LAYERS),
            n_heads=n_heads,
            max_positions=cfg_int(cfg, "max_position_embeddings", 512, hi=MAX_POSITIONS),
            eps=cfg_float(cfg, "layer_norm_eps", 1e-12),
            activation=act,
        )


class Bert:
    def __init__(self, weights: Weights, config: dict) -> None:
        cfg = self.cfg = BertConfig.from_hf(config)
        w = weights
        self.act = _ACTIVATIONS[cfg.activation]
        e = "embeddings."
        self.word = w.embedding(e + "word_embeddings.weight")
        self.position = w.matrix(e + "position_embeddings.weight")
        self.token_type = w.matrix(e + "token_type_embeddings.weight")
        self.emb_ln = (w.vector(e + "LayerNorm.weight"), w.vector(e + "LayerNorm.bias"))
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            self.layers.append(
                dict(
                    q=w.linear(a + "self.query.weight", a + "self.query.bias"),
                    k=w.linear(a + "self.key.weight", a + "self.key.bias"),
                    v=w.linear(a + "self.value.weight", a + "self.value.bias"),
                    o=w.linear(a + "output.dense.weight", a + "output.dense.bias"),
                    ln_1=(w.vector(a + "output.LayerNorm.weight"), w.vector(a + "output.LayerNorm.bias")),
                    up=w.linear(p + "intermediate.dense.weight", p + "intermediate.dense.bias"),
                    down=w.linear(p + "output.dense.weight", p + "output.dense.bias"),
                    ln_2=(w.vector(p + "output.LayerNorm.weight"), w.vector(p + "output.LayerNorm.bias")),
                )
            )

    def hidden_states(self, ids: np.ndarray) -> np.ndarray:
        """Last hidden states (T, H) for one unpadded sequence."""
        cfg = self.cfg
        ids = np.asarray(ids, dtype=np.int64)
        T = len(ids)
        if T > cfg.max_positions:
            raise QConvertError(f"the text has {T} tokens; the model takes at most {cfg.max_positions}")
        nh, hd = cfg.n_heads, cfg.hidden_size // cfg.n_heads
        x = self.word(ids) + self.position[:T] + self.token_type[0]
        x = layer_norm(x, *self.emb_ln, cfg.eps)
        scale = np.float32(1.0 / np.sqrt(hd))
        for L in self.layers:
            q = L["q"](x).reshape(T, nh, hd).transpose(1, 0, 2)
            k = L["k"](x).reshape(T, nh, hd).transpose(1, 0, 2)
            v = L["v"](x).reshape(T, nh, hd).transpose(1, 0, 2)
            att = (softmax(q @ k.transpose(0, 2, 1) * scale) @ v).transpose(1, 0, 2).reshape(T, cfg.hidden_size)
            x = layer_norm(x + L["o"](att), *L["ln_1"], cfg.eps)
            x = layer_norm(x + L["down"](self.act(L["up"](x))), *L["ln_2"], cfg.eps)
        return x

    def embed(self, ids: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Sentence embedding: mean of the last hidden states (L2-normalised by default)."""
        e = self.hidden_states(ids).mean(axis=0)
        return e / np.linalg.norm(e) if normalize else e


def _runtime(weights: Weights, config: dict) -> Bert:
    return Bert(Weights(weights.c, prefixes=("", "bert.")), config)


ARCH = Arch(name="bert", model_types=("bert",), gguf_arch="bert", tensors=TENSORS, parse_config=BertConfig.from_hf,
            kind="encoder", runtime=_runtime, hf_prefixes=("bert.", ""), layer_prefix="encoder.layer.{i}.")
