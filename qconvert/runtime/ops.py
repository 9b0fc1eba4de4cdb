"""Small numpy operations the architectures share (the heavy lifting is in kernels/)."""

from __future__ import annotations

import math

import numpy as np
from numba import vectorize


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # (T, H): x / sqrt(mean(x^2) + eps) * w, all in float32 as transformers does
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * weight


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True, dtype=np.float32)
    return xc / np.sqrt(var + np.float32(eps)) * weight + bias


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's "gelu_new"."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


@vectorize(["float32(float32)"], cache=True)
def gelu_erf(x):
    """BERT's exact GELU, x * Phi(x)."""
    return np.float32(0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def rope_tables(positions: np.ndarray, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (T, head_dim) for HF's rotate-half RoPE."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).astype(np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """RoPE's inverse frequencies (head_dim / 2,), float64, after any scaling."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return _scaled_inv_freq(inv_freq, scaling) if scaling else inv_freq


def _scaled_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: frequency / factor
        return inv_freq / np.asarray(scaling["factors"], dtype=np.float64)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(is_mid, mid, scaled)
    from ..errors import QConvertError

    raise QConvertError(f"RoPE scaling type {kind!r} is not supported by the runtime")


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, T, head_dim), rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
