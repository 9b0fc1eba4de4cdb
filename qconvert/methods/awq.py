"""AWQ (Lin et al., 2023): protect the input channels that carry large activations by scaling
them up in the weight (and down in the input) before quantization, then clip weight ranges.

Pure functions over arrays, following AutoAWQ (``awq/quantize/quantizer.py`` ``scale.py``):

* :func:`activation_stats` / :func:`weight_stats` - the two per-input-channel statistics;
* :func:`search_scale` - the 20-point grid over α, ``s = x^α / (w^(1−α) + 1e-4)``; the caller
  supplies the loss of the inspected module with ``Q(W·s)/s`` in place of ``W``
  (:func:`scaled_pseudo_quantize`, and :func:`linear_group_loss` when the module is just the
  linears themselves);
* :func:`fold_into_norm` / :func:`fold_into_linear` - apply the chosen ``s`` exactly
  (``1/s`` goes into the previous op, ``s`` into the weights), AutoAWQ's scale_ln_fcs / scale_fc_fc;
* :func:`search_clip` / :func:`apply_clip` - per (row, group) symmetric clamp that minimises
  the group's output MSE on a token sample;
* :func:`pseudo_quantize` - AutoAWQ's asymmetric (zero-point) group quantizer, also used for the
  final integers.

Convention: weights are (out, in) as in torch; activations are (tokens, in). Weights come back
as float32. As in :mod:`qconvert.blocks.grid`, scales are rounded to fp16 before the integers are chosen
(``fp16_scales=True``) so that what the container stores dequantizes to what the search saw;
AutoAWQ gets the same effect by running the whole search in fp16.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import QConvertError
from ..blocks.grid import check_bits, round_scale_fp16


def _group_len(in_features: int, group: int) -> int:
    if group == -1 or group == 0:
        return in_features
    if group < 0 or in_features % group:
        raise QConvertError(
            f"AWQ needs the input width ({in_features}) to be a multiple of --group ({group}); use --group -1 or a divisor"
        )
    return group


# ----------------------------------------------------------------------------- quantizer


def pseudo_quantize(W: np.ndarray, bits: int = 4, group: int = 128, zero_point: bool = True, fp16_scales: bool = True):
    """AutoAWQ ``pseudo_quantize_tensor`` on groups of ``group`` consecutive input columns.

    zero_point (asymmetric)::

        scale = (max − min).clamp(min=1e-5) / maxq        maxq = 2**bits − 1
        zero  = clamp(−round(min / scale), 0, maxq)
        q     = clamp(round(w / scale) + zero, 0, maxq);   w' = (q − zero)·scale

    symmetric (``zero_point=False``): ``scale = max|w|.clamp(1e-5) / (2**(bits−1) − 1)``,
    ``q = clamp(round(w / scale), −2**(bits−1), 2**(bits−1) − 1)``, ``w' = q·scale``.
    Unlike GPTQ's quantizer the range is *not* widened to include 0.

    Returns ``(W' (out, in) float32, q (out, in) uint8 [int8 when symmetric],
    scales (out, n_groups) float32, zeros (out, n_groups) int32 or None)``.
    """
    W = np.asarray(W)
    out, n = W.shape
    gl = _group_len(n, group)
    w = W.astype(np.float64).reshape(-1, gl)
    if not np.isfinite(w).all():
        raise QConvertError("AWQ: weight contains inf or NaN")
    if zero_point:
        maxq = check_bits(bits)
        max_val = w.max(axis=1, keepdims=True)
        min_val = w.min(axis=1, keepdims=True)
        scales = np.maximum(max_val - min_val, 1e-5) / maxq
        if fp16_scales:
            scales = round_scale_fp16(scales)
        zeros = np.clip(-np.rint(min_val / scales), 0, maxq)
        q = np.clip(np.rint(w / scales) + zeros, 0, maxq)
        wq = (q - zeros) * scales
        q_dtype = np.uint8
    else:
        check_bits(bits)
        max_int = 2 ** (bits - 1) - 1
        min_int = -(2 ** (bits - 1))
        scales = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-5) / max_int
        if fp16_scales:
            scales = round_scale_fp16(scales)
        zeros = None
        q = np.clip(np.rint(w / scales), min_int, max_int)
        wq = q * scales
        q_dtype = np.int8
    return (
        wq.reshape(out, n).astype(np.float32),
        q.reshape(out, n).astype(q_dtype),
        scales.reshape(out, -1).astype(np.float32),
        None if zeros is None else zeros.reshape(out, -1).astype(np.int32),
    )


# ----------------------------------------------------------------------------- statistics


def activation_stats(X: np.ndarray, chunk_tokens: int = 8192) -> np.ndarray:
    """``x_mean``: per-input-channel mean of ``|x|`` over all tokens of ``X`` (..., in).

    Summed chunk by chunk in float64 (AutoAWQ: fp32 chunks, so fp16 activations never
    accumulate in fp16); returned as float32 (in,).
    """
    X = np.asarray(X)
    X = X.reshape(-1, X.shape[-1])
    total = np.zeros(X.shape[1], np.float64)
    for t0 in range(0, X.shape[0], chunk_tokens):
        total += np.abs(X[t0 : t0 + chunk_tokens].astype(np.float64)).sum(axis=0)
    return (total / max(X.shape[0], 1)).astype(np.float32)


def weight_stats(W_concat: np.ndarray, group: int = 128) -> np.ndarray:
    """``w_mean``: per-input-channel mean over rows of ``|w| / (max|w| in its group + 1e-6)``.

    ``W_concat`` is the row-wise concatenation (out₁+out₂+…, in) of the linears that share the
    input (e.g. q, k, v). Returns float32 (in,).
    """
    W = np.asarray(W_concat, dtype=np.float64)
    out, n = W.shape
    gl = _group_len(n, group)
    a = np.abs(W).reshape(-1, gl)
    a = a / (a.max(axis=1, keepdims=True) + 1e-6)
    return a.reshape(out, n).mean(axis=0).astype(np.float32)


# ----------------------------------------------------------------------------- scale search


def scales_for_ratio(x_mean: np.ndarray, w_mean: np.ndarray, ratio: float, duo_scaling: bool = True) -> np.ndarray:
    """The candidate ``s`` for one α: ``x^α / (w^(1−α) + 1e-4)`` (or ``x^α``), clamped at 1e-4,
    divided by ``sqrt(max(s)·min(s))``; inf/NaN entries become 1. float32 (in,)."""
    x = np.asarray(x_mean, np.float64)
    if duo_scaling:
        s = x**ratio / (np.asarray(w_mean, np.float64) ** (1 - ratio) + 1e-4)
    else:
        s = x**ratio
    s = np.maximum(s, 1e-4)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = s / np.sqrt(s.max() * s.min())
    s[~np.isfinite(s)] = 1.0
    return s.astype(np.float32)


def search_scale(
    x_mean: np.ndarray,
    w_mean: np.ndarray,
    evaluate_loss: Callable[[np.ndarray], float],
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[np.ndarray, float, list[float]]:
    """Grid search over α = i/n_grid, i = 0..n_grid−1 (α = 1 is not tried, as in AutoAWQ).

    ``evaluate_loss(s)`` must return the MSE between the inspected module's original output and
    its output with every scaled linear's weight replaced by ``Q(W·s)/s``
    (:func:`scaled_pseudo_quantize`). The first strictly lowest loss wins.
    Returns ``(best_s float32 (in,), best_ratio, losses per α)``.
    """
    best_loss, best_ratio, best_s = np.inf, -1.0, None
    losses: list[float] = []
    for i in range(n_grid):
        ratio = i / n_grid
        s = scales_for_ratio(x_mean, w_mean, ratio, duo_scaling)
        loss = float(evaluate_loss(s))
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_ratio, best_s = loss, ratio, s
    if best_s is None:
        raise QConvertError("AWQ scale search produced no finite loss (the calibration outputs contain inf or NaN)")
    return best_s, best_ratio, losses


def scaled_pseudo_quantize(W: np.ndarray, s: np.ndarray, bits: int = 4, group: int = 128) -> np.ndarray:
    """``Q(W·s) / s``: the weight the scale search evaluates (input columns scaled by ``s``)."""
    s = np.asarray(s, np.float32)
    return pseudo_quantize(np.asarray(W, np.float32) * s, bits, group)[0] / s


def linear_group_loss(X: np.ndarray, Ws: Sequence[np.ndarray], bits: int = 4, group: int = 128):
    """``evaluate_loss`` for when the inspected module is just the linears sharing input ``X``
    (tokens, in): MSE of the concatenated outputs ``X Wᵀ`` vs ``X (Q(W·s)/s)ᵀ``.

    With ``D = Q(W·s)/s − W`` the sum of squares over tokens and outputs is ``Σ_o d_oᵀ C d_o``,
    ``C = XᵀX``: computed through ``C`` (summed over the tokens once, in float64) instead of
    through the (tokens, out) outputs, which costs ``out·in²`` per candidate instead of
    ``tokens·in·out`` (a few times less at 8192 tokens) and has no cancellation between two
    nearly equal outputs.
    """
    X = np.asarray(X, np.float32).reshape(-1, np.shape(X)[-1])
    C = np.zeros((X.shape[1], X.shape[1]), np.float64)
    for t0 in range(0, X.shape[0], 8192):
        x = X[t0 : t0 + 8192].astype(np.float64)
        C += x.T @ x
    C = C.astype(np.float32)
    Ws = [np.asarray(W, np.float32) for W in Ws]
    n_out = X.shape[0] * sum(W.shape[0] for W in Ws)

    def loss(s: np.ndarray) -> float:
        total = 0.0
        for W in Ws:
            D = scaled_pseudo_quantize(W, s, bits, group) - W
            total += float(np.einsum("oi,oi->", D @ C, D, dtype=np.float64))
        return total / n_out

    return loss


# ----------------------------------------------------------------------------- folding


def fold_into_norm(norm_weight: np.ndarray, norm_bias: np.ndarray | None, linears: Sequence[np.ndarray], s: np.ndarray):
    """Fold ``s`` between a norm and the linears reading its output (AutoAWQ scale_ln_fcs):
    norm weight (and bias) ``/= s``, each linear's input columns ``*= s``. Exact in real
    arithmetic. (A Gemma-style ``(1 + weight)`` norm needs ``(1 + w)/s − 1`` instead.)

    Returns ``(norm_weight, norm_bias or None, [linear weights])`` as new arrays.
    """
    s = np.asarray(s, np.float32)
    nw = (np.asarray(norm_weight) / s).astype(np.asarray(norm_weight).dtype)
    nb = None if norm_bias is None else (np.asarray(norm_bias) / s).astype(np.asarray(norm_bias).dtype)
    return nw, nb, [(np.asarray(W) * s[None, :]).astype(np.asarray(W).dtype) for W in linears]


def fold_into_linear(prev_W: np.ndarray, prev_b: np.ndarray | None, next_Ws: Sequence[np.ndarray], s: np.ndarray):
    """Fold ``s`` between two linears (AutoAWQ scale_fc_fc): the previous linear's output rows
    (and bias) ``/= s``, the next linears' input columns ``*= s``. When ``prev_W`` has more rows
    than ``s`` (a fused qkv feeding o_proj), only its *last* ``len(s)`` rows are scaled, as in
    AutoAWQ. Valid only if nothing non-linear sits between the two (v_proj → o_proj, up → down).

    Returns ``(prev_W, prev_b or None, [next weights])`` as new arrays.
    """
    s = np.asarray(s, np.float32)
    k = s.shape[0]
    pW = np.array(prev_W, copy=True)
    pW[-k:] = pW[-k:] / s[:, None]
    pb = None
    if prev_b is not None:
        pb = np.array(prev_b, copy=True)
        pb[-k:] = pb[-k:] / s
    return pW, pb, [(np.asarray(W) * s[None, :]).astype(np.asarray(W).dtype) for W in next_Ws]


# ----------------------------------------------------------------------------- clipping


def search_clip(
    W: np.ndarray,
    X_sample: np.ndarray,
    bits: int = 4,
    group: int = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    rows_per_batch: int = 256,
) -> np.ndarray:
    """AutoAWQ ``_compute_best_clip``: for every (row, group) try ``max_val = org_max·(1 − i/n_grid)``
    for ``i < max_shrink·n_grid``, clamp the group to ``[−max_val, max_val]``, pseudo-quantize,
    and keep the ``max_val`` whose partial output ``Σ_{k in group} x_k w_k`` has the lowest MSE
    over the sampled tokens (every ``max(1, tokens // n_sample_tokens)``-th token of ``X_sample``).

    Returns ``max_val`` (out, n_groups) float32, for :func:`apply_clip`. AutoAWQ skips this for
    q/k projections (names with ``q_``, ``k_``, ``query``, ``key``, ``Wqkv``): the caller decides.
    """
    W = np.asarray(W, np.float32)
    out, n = W.shape
    gl = _group_len(n, group)
    ng = n // gl
    X = np.asarray(X_sample, np.float32).reshape(-1, n)
    X = X[:: max(1, X.shape[0] // n_sample_tokens)]
    # The group's partial output error on token t is x_t,gᵀ d_g with d = Q(clip(w)) − w, so its
    # mean square over the tokens is d_gᵀ C_g d_g / T with C_g = X_gᵀ X_g: same number as
    # AutoAWQ's (cur_out − org_out)².mean(tokens), without materialising (rows, tokens, groups).
    Xg = X.astype(np.float64).reshape(-1, ng, gl).transpose(1, 0, 2)  # (ng, T, gl)
    C = (Xg.transpose(0, 2, 1) @ Xg) / X.shape[0]  # (ng, gl, gl)

    best_all = np.empty((out, ng), np.float32)
    for r0 in range(0, out, rows_per_batch):
        w = W[r0 : r0 + rows_per_batch]
        rb = w.shape[0]
        wg = w.reshape(rb, ng, gl)
        org_max = np.abs(wg).max(axis=2)  # (rb, ng)
        best = org_max.copy()
        min_err = np.full((rb, ng), np.inf)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur = np.clip(wg, -max_val[:, :, None], max_val[:, :, None])
            qw = pseudo_quantize(cur.reshape(rb, n), bits, group)[0].reshape(rb, ng, gl)
            d = (qw.astype(np.float64) - wg).transpose(1, 0, 2)  # (ng, rb, gl)
            err = ((d @ C) * d).sum(axis=2).T  # (rb, ng)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all[r0 : r0 + rb] = best
    return best_all


def apply_clip(W: np.ndarray, max_val: np.ndarray) -> np.ndarray:
    """Clamp every (row, group) of ``W`` to ``[−max_val, max_val]``; returns a new float32 array."""
    W = np.asarray(W, np.float32)
    out, n = W.shape
    ng = max_val.shape[1]
    m = np.asarray(max_val, np.float32)[:, :, None]
    return np.clip(W.reshape(out, ng, n // ng), -m, m).reshape(out, n)
