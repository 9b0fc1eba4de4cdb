"""Sub-layers that several decoder families share, written against :class:`~.base.Layer`.

Shapes: ``x`` (B, T, H) -- B sequences of T new tokens (the runtime: B = 1 after a KV cache;
calibration: B windows from position 0). Heads are laid out (B, heads, T, head_dim).
"""

from __future__ import annotations

import numpy as np

from ..runtime.ops import apply_rope, gelu_tanh, rms_norm, silu, softmax
from .base import Context, Layer

ACTIVATIONS = {"silu": silu, "swish": silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu_tanh": gelu_tanh}


def rms_norm_offset(x: np.ndarray, w: np.ndarray, eps: float, offset: float) -> np.ndarray:
    """RMSNorm times ``(offset + w)`` (Gemma: offset 1), else the plain weight."""
    return rms_norm(x, w + np.float32(offset) if offset else w, eps)


def split_heads(y: np.ndarray, n: int, hd: int) -> np.ndarray:
    """(B, T, n*hd) -> (B, n, T, hd)."""
    B, T, _ = y.shape
    return y.reshape(B, T, n, hd).transpose(0, 2, 1, 3)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, ctx: Context, layer: int, scale: float,
           window: int | None = None, softcap: float | None = None) -> np.ndarray:
    """Causal grouped-query attention. q (B, nh, T, hd), k/v (B, nkv, T, hd) -> (B, T, nh*hd).

    With a KV cache (B = 1) the new keys/values are stored at ``pos0..S`` and the queries see
    all ``S``; without one each sequence sees its own T tokens."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    if ctx.cache is not None:
        c = ctx.cache
        c.k[layer][:, ctx.pos0:ctx.S] = k[0]
        c.v[layer][:, ctx.pos0:ctx.S] = v[0]
        keys, values = c.k[layer][None, :, :ctx.S], c.v[layer][None, :, :ctx.S]
    else:
        keys, values = k, v
    S = keys.shape[2]
    mask = ctx.mask(window)
    scale = np.float32(scale)
    out = np.empty((B, T, nh * hd), np.float32)
    for b in range(B):  # one sequence at a time keeps the (heads, T, S) scores small
        if ctx.cache is not None:  # decode / prompt: each KV head serves its group of query heads
            qg = q[b].reshape(nkv, group * T, hd)
            scores = (qg @ keys[b].transpose(0, 2, 1)).reshape(nkv, group, T, S) * scale
        else:  # calibration: KV heads repeated, one product per query head (as GPTQ/AWQ were measured)
            kb, vb = np.repeat(keys[b], group, axis=0), np.repeat(values[b], group, axis=0)
            scores = q[b] @ kb.transpose(0, 2, 1) * scale  # (nh, T, S)
        if softcap:
            cap = np.float32(softcap)
            scores = np.tanh(scores / cap) * cap
        if ctx.cache is not None:
            att = softmax(scores + mask, axis=-1).reshape(nkv, group * T, S) @ values[b]
        else:
            att = softmax(scores + mask, axis=-1) @ vb
        out[b] = att.reshape(nh, T, hd).transpose(1, 0, 2).reshape(T, nh * hd)
    return out


def gated_mlp(layer: Layer, h: np.ndarray, act, gate: str = "mlp.gate_proj.weight", up: str = "mlp.up_proj.weight",
              down: str = "mlp.down_proj.weight") -> np.ndarray:
    """``down(act(gate(h)) * up(h))`` (SwiGLU / GeGLU)."""
    g, u = layer.linears((gate, up), h)
    return layer.linears((down,), act(g) * u)[0]


def fused_gated_mlp(layer: Layer, h: np.ndarray, act, gate_up: str, down: str) -> np.ndarray:
    """Phi-3's ``gate_up_proj``: one matrix whose first half of rows is the gate."""
    gu = layer.linears((gate_up,), h)[0]
    half = gu.shape[-1] // 2
    return layer.linears((down,), act(gu[..., :half]) * gu[..., half:])[0]


def moe_mlp(layer: Layer, h: np.ndarray, act, router: str, experts: list[tuple[str, str, str]], top_k: int,
            normalize: bool) -> np.ndarray:
    """Mixture of experts as transformers' Mixtral / Qwen3-MoE: softmax (float32) over the
    router's logits, the top-k experts per token (ties: the lower index), their probabilities
    renormalised over the chosen k when ``normalize``; each expert a gated MLP run on its own
    tokens only, its output times the token's weight, summed in expert order.

    The router reads ``h`` in its (B, T, H) shape: calibration records it as the layer's whole
    input (AWQ's statistics and search windows for the experts' shared norm)."""
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    logits = layer.linears((router,), h)[0].reshape(flat.shape[0], -1)  # (N, n_experts)
    probs = softmax(logits.astype(np.float32), axis=-1)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, order, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    out = np.zeros_like(flat)
    for e, (gate, up, down) in enumerate(experts):
        rows, slot = np.nonzero(order == e)
        if rows.size == 0:
            continue
        x = flat[rows]
        g, u = layer.linears((gate, up), x)
        y = layer.linears((down,), act(g) * u)[0]
        out[rows] += y * weights[rows, slot][:, None].astype(np.float32)
    return out.reshape(shape)


def partial_rope(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RoPE on the first ``cos.shape[-1]`` dimensions of each head, the rest passed through
    (transformers' ``partial_rotary_factor``; the whole head when the tables span it)."""
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return rope(q, k, cos, sin)
    return tuple(np.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1) for x in (q, k))


def qk_heads(layer: Layer, h: np.ndarray, names: tuple[str, str, str], nh: int, nkv: int, hd: int):
    """q, k, v heads from separate projections (biases applied by the layer when present)."""
    q, k, v = layer.linears(names, h)
    return split_heads(q, nh, hd), split_heads(k, nkv, hd), split_heads(v, nkv, hd)


def rope(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
