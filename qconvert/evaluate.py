"""Perplexity and KL divergence, with llama.cpp's ``llama-perplexity`` protocol.

The text is tokenized whole, cut into non-overlapping windows of ``ctx`` tokens (the first
token of each window replaced by BOS when the tokenizer adds one), and only the second half
of each window is scored: the logits at positions ctx/2 .. ctx-2 predict the next token.
With a reference model, the same windows also give the mean KL divergence KL(ref || model),
the share of positions where both pick the same top-1 token, and the RMS of the change in
the probability of the correct token (llama-perplexity ``--kl-divergence``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import QConvertError
from .runtime.ops import log_softmax


@dataclass
class EvalResult:
    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    nll_mean: float
    seconds: float
    reference: dict | None = None
    per_chunk_ppl: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        ref = self.reference or {}
        kld = f", kld_mean={ref['kld_mean']:.5f}, ppl_ratio={ref['ppl_ratio']:.4f}" if ref else ""
        return f"EvalResult(ppl={self.ppl:.4f}{kld}, {self.chunks} windows of {self.ctx} tokens)"


def read_text(path) -> str:
    """Read an evaluation text file; CRLF and CR line endings become LF."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise QConvertError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise QConvertError(f"{path} is not UTF-8 text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def make_windows(tokens: list[int], ctx: int, chunks: int | None, bos_id: int | None) -> list[np.ndarray]:
    if ctx < 4:
        raise QConvertError("--ctx must be at least 4")
    available = len(tokens) // ctx
    if available == 0:
        raise QConvertError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    n = available if chunks is None else min(chunks, available)
    windows = []
    for i in range(n):
        w = np.array(tokens[i * ctx : (i + 1) * ctx], dtype=np.int64)
        if bos_id is not None:
            w[0] = bos_id
        windows.append(w)
    return windows


def _scored(model, window: np.ndarray) -> np.ndarray:
    """log-probabilities (ctx/2 - 1, vocab) at the scored positions of one window."""
    ctx = len(window)
    first = ctx // 2
    cache = model.new_cache(ctx)
    logits = model.forward(window, cache, all_logits=True)
    return log_softmax(logits[first : ctx - 1])


def reference_logprobs(reference, tokens: list[int], ctx: int = 512, chunks: int | None = None,
                       bos_id: int | None = None) -> list[np.ndarray]:
    """The reference's log-probabilities on every window, computed once to compare many models."""
    return [_scored(reference, w).astype(np.float32) for w in make_windows(tokens, ctx, chunks, bos_id)]


def evaluate(model, tokens: list[int], ctx: int = 512, chunks: int | None = None, bos_id: int | None = None,
             reference=None, progress=None, reference_logp: list[np.ndarray] | None = None) -> EvalResult:
    """``reference`` (a model) or ``reference_logp`` (from :func:`reference_logprobs`) adds KLD."""
    from .runtime.kernels import blas_threads

    with blas_threads(1):  # numpy's BLAS threads would busy-wait between the numba kernels
        return _evaluate(model, tokens, ctx, chunks, bos_id, reference, progress, reference_logp)


def _evaluate(model, tokens, ctx, chunks, bos_id, reference, progress, reference_logp) -> EvalResult:
    windows = make_windows(tokens, ctx, chunks, bos_id)
    if reference_logp is not None and len(reference_logp) != len(windows):
        raise ValueError("reference_logp does not cover the same windows")
    first = ctx // 2
    nll_sum, count = 0.0, 0
    ref_nll_sum = 0.0
    kld: list[np.ndarray] = []
    same_top: list[np.ndarray] = []
    dp: list[np.ndarray] = []
    per_chunk = []
    t0 = time.perf_counter()
    for i, w in enumerate(windows):
        targets = w[first + 1 :]
        logp = _scored(model, w)
        idx = np.arange(len(targets))
        nll = -logp[idx, targets]
        nll_sum += float(nll.sum())
        count += len(targets)
        per_chunk.append(float(np.exp(nll.mean())))
        if reference is not None or reference_logp is not None:
            ref_logp = reference_logp[i].astype(np.float64) if reference_logp is not None else _scored(reference, w)
            ref_nll_sum += float(-ref_logp[idx, targets].sum())
            p_ref = np.exp(ref_logp)
            kld.append(np.sum(p_ref * (ref_logp - logp), axis=-1))
            same_top.append(np.argmax(ref_logp, axis=-1) == np.argmax(logp, axis=-1))
            dp.append(np.exp(logp[idx, targets]) - p_ref[idx, targets])
        if progress is not None:
            progress(i + 1, len(windows))
    seconds = time.perf_counter() - t0
    result = EvalResult(ctx, len(windows), count, float(np.exp(nll_sum / count)), nll_sum / count, seconds,
                        per_chunk_ppl=per_chunk)
    if kld:
        k = np.concatenate(kld)
        ref_ppl = float(np.exp(ref_nll_sum / count))
        result.reference = {
            "ppl": ref_ppl,
            "ppl_ratio": result.ppl / ref_ppl,
            "kld_mean": float(k.mean()),
            "kld_median": float(np.median(k)),
            "kld_p99": float(np.percentile(k, 99)),
            "kld_max": float(k.max()),
            "top1_agreement": float(np.concatenate(same_top).mean()),
            "rms_dp": float(np.sqrt(np.mean(np.concatenate(dp) ** 2))),
        }
    return result
