"""Text generation: greedy by default, temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import QConvertError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    ids: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of the prompt pass; the rest from decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def sample_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a (vocab,) logits vector. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    z = z[order]
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def generate(
    model,
    prompt_ids: list[int],
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
) -> GenerationStats:
    from .kernels import blas_threads

    with blas_threads(1):  # numpy's BLAS threads would busy-wait between the numba kernels
        return _generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, stop_ids, on_token)


def _generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, stop_ids, on_token) -> GenerationStats:
    if not prompt_ids:
        raise QConvertError("the prompt encodes to no tokens")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise QConvertError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    rng = np.random.default_rng(seed)
    capacity = min(len(prompt_ids) + max_tokens, model.cfg.max_positions)
    if len(prompt_ids) >= capacity:
        raise QConvertError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {model.cfg.max_positions}")
    cache = model.new_cache(capacity)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    t0 = time.perf_counter()
    logits = model.forward(np.array(prompt_ids), cache, all_logits=False)[-1]
    stats.prompt_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while stats.generated_tokens < max_tokens:
        token = sample_next(logits, temperature, top_k, top_p, rng)
        stats.ids.append(token)
        stats.generated_tokens += 1
        if on_token is not None:
            on_token(token)
        if token in stop_ids or cache.length >= capacity or stats.generated_tokens >= max_tokens:
            break
        logits = model.forward(np.array([token]), cache, all_logits=False)[-1]
    stats.decode_seconds = time.perf_counter() - t0
    return stats
