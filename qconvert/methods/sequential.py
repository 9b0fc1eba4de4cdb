"""Layer-by-layer calibration of a Llama-family model for GPTQ and AWQ.

Only one transformer block's weights and activations are in memory at a time. The inputs of
block i are the outputs of block i-1:
- GPTQ: of the already *quantized* block i-1, and inside a block the sub-layers are done in
  order (q,k,v -> o -> gate,up -> down), each one's inputs computed with the sub-layers before
  it already quantized ("true sequential", GPTQ repo).
- AWQ: of the float block i-1, as AutoAWQ does; per block the scales of (input_layernorm ->
  q,k,v), (v -> o, only without GQA), (post_attention_layernorm -> gate,up) and (up -> down)
  are searched on the block's float outputs, folded in, the clip searched, then quantized.
  The activation statistics use every calibration token; the grid-search losses that need a
  forward pass of the attention or the MLP per candidate use the first windows holding
  ``AWQ_SEARCH_TOKENS`` tokens (4096: 8 windows of 512), which bounds AWQ's cost on a CPU
  whatever ``--calib-samples`` is (the linear-only losses use all tokens: they cost no forward
  pass, see :func:`..awq.linear_group_loss`).

The block math is a plain float32 numpy transcription of the runtime's llama.py (rotate-half
RoPE, GQA, RMSNorm, SwiGLU); it returns, per quantized matrix, the integer codes and
parameters (``QuantizedLinear``) and, for AWQ, the norm weights with the scales folded in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import QConvertError
from ..runtime.llama import LlamaConfig
from ..runtime.ops import apply_rope, rms_norm, rope_tables, softmax
from . import awq as awq_core
from .gptq import Hessian, gptq_quantize

AWQ_SEARCH_TOKENS = 4096
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantizedLinear:
    q: np.ndarray  # (out, in) uint8 integer codes, columns in stored order
    scales: np.ndarray  # (out, n_groups) float32 (fp16-exact)
    zeros: np.ndarray  # (out, n_groups) integer zero points
    perm: np.ndarray | None = None  # act-order: stored column j is original column perm[j]

    def dequantize(self) -> np.ndarray:
        """Float weights in the original column order (what the model computes with)."""
        group = self.q.shape[1] // self.scales.shape[1]
        s = np.repeat(self.scales, group, axis=1)
        z = np.repeat(self.zeros, group, axis=1)
        w = (self.q.astype(np.float32) - z) * s
        if self.perm is not None:
            out = np.empty_like(w)
            out[:, self.perm] = w
            return out
        return w


@dataclass
class SequentialResult:
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    floats: dict[str, np.ndarray] = field(default_factory=dict)  # modified float tensors (AWQ-folded norms)
    stats: dict = field(default_factory=dict)


class _Block:
    """One decoder block's float weights, read from the source when needed."""

    def __init__(self, load: Callable[[str], np.ndarray], i: int) -> None:
        p = f"model.layers.{i}."
        self.prefix = p
        self.attn_norm = load(p + "input_layernorm.weight")
        self.mlp_norm = load(p + "post_attention_layernorm.weight")
        self.W = {n: load(p + ("self_attn." if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + n + ".weight")
                  for n in LINEARS}

    def name(self, linear: str) -> str:
        kind = "self_attn." if linear in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp."
        return f"{self.prefix}{kind}{linear}.weight"


def _attention(h: np.ndarray, blk: _Block, cfg: LlamaConfig, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """h (N, L, H) -> the attention heads' output before o_proj, (N, L, n_heads*head_dim)."""
    N, L, _ = h.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = nh // nkv
    q = (h @ blk.W["q_proj"].T).reshape(N, L, nh, hd).transpose(0, 2, 1, 3)
    k = (h @ blk.W["k_proj"].T).reshape(N, L, nkv, hd).transpose(0, 2, 1, 3)
    v = (h @ blk.W["v_proj"].T).reshape(N, L, nkv, hd).transpose(0, 2, 1, 3)
    mask = np.triu(np.full((L, L), -np.inf, np.float32), 1)
    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.empty((N, L, nh * hd), np.float32)
    for n in range(N):  # one sequence at a time keeps the (heads, L, L) scores small
        qn, kn = apply_rope(q[n], cos, sin), apply_rope(k[n], cos, sin)
        kn, vn = np.repeat(kn, g, axis=0), np.repeat(v[n], g, axis=0)
        att = softmax(qn @ kn.transpose(0, 2, 1) * scale + mask) @ vn  # (nh, L, hd)
        out[n] = att.transpose(1, 0, 2).reshape(L, nh * hd)
    return out


def _mlp_hidden(h2: np.ndarray, blk: _Block) -> np.ndarray:
    """``silu(h2 Wgᵀ) * (h2 Wuᵀ)``, the same float32 operations as ``ops.silu``, done in place
    (AWQ evaluates this 20 times per block on every search token)."""
    g = h2 @ blk.W["gate_proj"].T
    t = np.negative(g)
    np.exp(t, out=t)
    t += np.float32(1.0)
    np.divide(g, t, out=g)
    g *= h2 @ blk.W["up_proj"].T
    return g


def _block_forward(x: np.ndarray, blk: _Block, cfg: LlamaConfig, cos, sin) -> np.ndarray:
    h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
    x = x + _attention(h, blk, cfg, cos, sin) @ blk.W["o_proj"].T
    h2 = rms_norm(x, blk.mlp_norm, cfg.rms_eps)
    return x + _mlp_hidden(h2, blk) @ blk.W["down_proj"].T


def _check_llama(config: dict, names: set[str]) -> LlamaConfig:
    cfg = LlamaConfig.from_hf(config)
    if cfg.attention_bias or any(n.endswith("_proj.bias") for n in names):
        raise QConvertError("GPTQ/AWQ calibration supports Llama blocks without projection biases")
    return cfg


def _embed(load, tokens: np.ndarray) -> np.ndarray:
    emb = load("model.embed_tokens.weight")
    return emb[tokens].astype(np.float32)  # (N, L, H)


def _same_group(in_features: int, group: int) -> int:
    return group


def gptq_model(load: Callable[[str], np.ndarray], config: dict, names: set[str], tokens: np.ndarray, bits: int,
               group: int, sym: bool, damp: float, act_order: bool, static_groups: bool,
               mse: bool = False, progress: Callable[[int, int], None] | None = None,
               group_of: Callable[[int, int], int] = _same_group) -> SequentialResult:
    """GPTQ every linear of every block, block by block, sub-layer by sub-layer."""
    cfg = _check_llama(config, names)
    N, L = tokens.shape
    cos, sin = rope_tables(np.arange(L), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = _embed(load, tokens)
    result = SequentialResult()
    losses = {}

    def quantize(blk: _Block, linear: str, H: Hessian) -> None:
        g = group_of(blk.W[linear].shape[1], group)
        if g is None:
            return  # no group size divides the rows: the matrix stays in float
        r = gptq_quantize(blk.W[linear], H.H, bits=bits, group=g, sym=sym, damp=damp,
                          act_order=act_order, static_groups=static_groups, mse=mse)
        perm = r.perm if (act_order and not static_groups) else None
        q, g_idx = r.q, r.g_idx
        if perm is not None:
            q = q[:, perm]  # stored in quantization order: groups are contiguous there
            assert np.array_equal(g_idx[perm], np.arange(len(perm)) // g)
        ql = QuantizedLinear(q, r.scales, r.zeros, perm)
        if perm is None and act_order and static_groups:
            # static groups keep group = column // group, so no permutation is needed to store
            assert np.array_equal(g_idx, np.arange(len(g_idx)) // g)
        result.linears[blk.name(linear)] = ql
        losses[blk.name(linear)] = float(r.loss)
        blk.W[linear] = ql.dequantize()  # later sub-layers see the quantized weights

    for i in range(cfg.n_layers):
        blk = _Block(load, i)
        h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
        H = Hessian(h.shape[-1]).add_batch(h)
        for linear in ("q_proj", "k_proj", "v_proj"):
            quantize(blk, linear, H)
        att = _attention(h, blk, cfg, cos, sin)
        quantize(blk, "o_proj", Hessian(att.shape[-1]).add_batch(att))
        x2 = x + att @ blk.W["o_proj"].T
        h2 = rms_norm(x2, blk.mlp_norm, cfg.rms_eps)
        H = Hessian(h2.shape[-1]).add_batch(h2)
        for linear in ("gate_proj", "up_proj"):
            quantize(blk, linear, H)
        a = _mlp_hidden(h2, blk)
        quantize(blk, "down_proj", Hessian(a.shape[-1]).add_batch(a))
        x = x2 + a @ blk.W["down_proj"].T  # the quantized block's output feeds the next block
        if progress is not None:
            progress(i + 1, cfg.n_layers)
    result.stats = {"loss": losses}
    return result


def awq_model(load: Callable[[str], np.ndarray], config: dict, names: set[str], tokens: np.ndarray, bits: int,
              group: int, n_grid: int = 20, clip: bool = True,
              progress: Callable[[int, int], None] | None = None,
              group_of: Callable[[int, int], int] = _same_group) -> SequentialResult:
    """AWQ: per block, search and fold activation-aware scales, search clips, quantize."""
    cfg = _check_llama(config, names)
    requested = group
    N, L = tokens.shape
    cos, sin = rope_tables(np.arange(L), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = _embed(load, tokens)
    result = SequentialResult()
    ratios = {}
    n_search = search_windows(N, L)
    for i in range(cfg.n_layers):
        blk = _Block(load, i)
        x_next = _block_forward(x, blk, cfg, cos, sin)  # float outputs feed the next block
        # 1. input_layernorm -> q, k, v; inspected module: attention up to o_proj's output
        h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
        h_s = h[:n_search]
        ref = _attention(h_s, blk, cfg, cos, sin) @ blk.W["o_proj"].T
        qkv = ("q_proj", "k_proj", "v_proj")
        g_h = group_of(h.shape[-1], requested)
        if g_h is None:
            raise QConvertError(f"hidden size {h.shape[-1]} cannot be split into groups of 32, 64 or 128")

        def attn_loss(s: np.ndarray) -> float:
            trial = _trial_block(blk, {n: awq_core.scaled_pseudo_quantize(blk.W[n], s, bits, g_h) for n in qkv})
            out = _attention(h_s, trial, cfg, cos, sin) @ blk.W["o_proj"].T
            return float(np.mean((out - ref) ** 2))

        s = _search(h, [blk.W[n] for n in qkv], g_h, attn_loss, n_grid)
        blk.attn_norm, _, folded = awq_core.fold_into_norm(blk.attn_norm, None, [blk.W[n] for n in qkv], s)
        for n, W in zip(qkv, folded):
            blk.W[n] = W
        ratios[blk.prefix + "qkv"] = s
        # 2. v_proj -> o_proj, only when their shapes line up (no grouped-query attention)
        h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
        att = _attention(h, blk, cfg, cos, sin)
        if cfg.n_kv_heads == cfg.n_heads:
            g_o = group_of(att.shape[-1], requested)
            s = _search(att, [blk.W["o_proj"]], g_o,
                        awq_core.linear_group_loss(att, [blk.W["o_proj"]], bits, g_o), n_grid)
            blk.W["v_proj"], _, folded = _fold_linear(blk.W["v_proj"], [blk.W["o_proj"]], s)
            blk.W["o_proj"] = folded[0]
            att = _attention(h, blk, cfg, cos, sin)
        # 3. post_attention_layernorm -> gate, up; inspected module: the MLP
        x2 = x + att @ blk.W["o_proj"].T
        h2 = rms_norm(x2, blk.mlp_norm, cfg.rms_eps)
        h2_s = h2[:n_search]
        ref = _mlp_hidden(h2_s, blk) @ blk.W["down_proj"].T
        gu = ("gate_proj", "up_proj")

        def mlp_loss(s: np.ndarray) -> float:
            trial = _trial_block(blk, {n: awq_core.scaled_pseudo_quantize(blk.W[n], s, bits, g_h) for n in gu})
            out = _mlp_hidden(h2_s, trial) @ blk.W["down_proj"].T
            return float(np.mean((out - ref) ** 2))

        s = _search(h2, [blk.W[n] for n in gu], g_h, mlp_loss, n_grid)
        blk.mlp_norm, _, folded = awq_core.fold_into_norm(blk.mlp_norm, None, [blk.W[n] for n in gu], s)
        blk.W["gate_proj"], blk.W["up_proj"] = folded
        # 4. up_proj -> down_proj
        h2 = rms_norm(x2, blk.mlp_norm, cfg.rms_eps)
        a = _mlp_hidden(h2, blk)
        g_a = group_of(a.shape[-1], requested)
        if g_a is not None:  # else down_proj stays in float and needs no scale
            s = _search(a, [blk.W["down_proj"]], g_a,
                        awq_core.linear_group_loss(a, [blk.W["down_proj"]], bits, g_a), n_grid)
            blk.W["up_proj"], _, folded = _fold_linear(blk.W["up_proj"], [blk.W["down_proj"]], s)
            blk.W["down_proj"] = folded[0]
        # 5. clip search on every linear's own inputs (q and k skipped, as AutoAWQ does)
        if clip:
            h = rms_norm(x, blk.attn_norm, cfg.rms_eps)
            att = _attention(h, blk, cfg, cos, sin)
            h2 = rms_norm(x + att @ blk.W["o_proj"].T, blk.mlp_norm, cfg.rms_eps)
            a = _mlp_hidden(h2, blk)
            inputs = {"v_proj": h, "o_proj": att, "gate_proj": h2, "up_proj": h2, "down_proj": a}
            for n, X in inputs.items():
                g = group_of(X.shape[-1], requested)
                if g is not None:
                    max_val = awq_core.search_clip(blk.W[n], X.reshape(-1, X.shape[-1]), bits, g)
                    blk.W[n] = awq_core.apply_clip(blk.W[n], max_val)
        # 6. final group-wise asymmetric quantization
        for n in LINEARS:
            g = group_of(blk.W[n].shape[1], requested)
            if g is None:
                result.floats[blk.name(n)] = blk.W[n].astype(np.float32)  # scaled, stays in float
                continue
            _, q, scales, zeros = awq_core.pseudo_quantize(blk.W[n], bits, g, zero_point=True)
            result.linears[blk.name(n)] = QuantizedLinear(q, scales, zeros)
        result.floats[blk.prefix + "input_layernorm.weight"] = blk.attn_norm.astype(np.float32)
        result.floats[blk.prefix + "post_attention_layernorm.weight"] = blk.mlp_norm.astype(np.float32)
        x = x_next
        if progress is not None:
            progress(i + 1, cfg.n_layers)
    result.stats = {"blocks": cfg.n_layers, "search_tokens": n_search * L}
    return result


def search_windows(n_windows: int, seqlen: int, budget: int | None = None) -> int:
    """How many of the first calibration windows AWQ's forward-pass losses use: enough to hold
    ``budget`` (default ``AWQ_SEARCH_TOKENS``) tokens, at least one, at most all."""
    budget = AWQ_SEARCH_TOKENS if budget is None else budget
    return max(1, min(n_windows, -(-budget // seqlen)))


def _search(X: np.ndarray, Ws: list[np.ndarray], group: int, loss, n_grid: int) -> np.ndarray:
    x_mean = awq_core.activation_stats(X.reshape(-1, X.shape[-1]))
    w_mean = awq_core.weight_stats(np.concatenate(Ws, axis=0), group)
    s, _, _ = awq_core.search_scale(x_mean, w_mean, loss, n_grid=n_grid)
    return s


def _fold_linear(prev: np.ndarray, nexts: list[np.ndarray], s: np.ndarray):
    return awq_core.fold_into_linear(prev, None, nexts, s)


def _trial_block(blk: _Block, replaced: dict[str, np.ndarray]) -> _Block:
    trial = object.__new__(_Block)
    trial.prefix, trial.attn_norm, trial.mlp_norm = blk.prefix, blk.attn_norm, blk.mlp_norm
    trial.W = {**blk.W, **replaced}
    return trial

