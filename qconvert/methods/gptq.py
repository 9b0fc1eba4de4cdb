"""GPTQ (Frantar et al., 2022): quantize one linear layer column by column, feeding each
column's rounding error back into the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss ``||W X - W' X||^2``.

The core is :func:`gptq_quantize`, a pure function ``(W, H) -> GPTQResult`` that follows
AutoGPTQ's ``GPTQ.fasterquant`` step by step (the numbers refer to the paper's Algorithm 1 and
to ``fasterquant``):

1. ``H = 2/N Σ x xᵀ`` accumulated over calibration tokens (:class:`Hessian`).
2. Dead inputs (``H_ii == 0``): set ``H_ii = 1`` and zero the weight column.
3. Static groups: every group's (scale, zero) fitted up front on the unmodified ``W``.
4. Act-order: columns permuted by descending ``diag(H)``.
5. Dampening: ``H += λ I`` with ``λ = damp · mean(diag H)``.
6. ``Hinv`` = upper Cholesky factor of ``H⁻¹`` (Cholesky, inverse, Cholesky).
7. Column blocks of ``block`` columns. Inside a block, column i is quantized, its error
   ``(w - q) / Hinv_ii`` is spread over the block's later columns at once, and the block's
   errors reach the columns after the block in one matrix product (lazy batched update).
   Non-static groups fit (scale, zero) at each group start on the *error-updated* weights.
8. The permutation is undone; ``g_idx`` maps every input column to its group.

``mse=True`` (GPTQ's ``mse`` option, ``--mse``) makes every group fit, static or at a group
start, search a shrunk range (:func:`qconvert.blocks.grid.shrink_range`). At 3 bits on SmolLM2 this is
what lets GPTQ beat round-to-nearest clearly (BENCHMARKS.md): the clipping error of the few
largest weights is fed back into the columns not yet quantized.

One point where we are exact and AutoGPTQ is not: AutoGPTQ fits a group's parameters on its
full-matrix copy of ``W``, which does not yet hold the current block's in-block updates, so
with a group start inside a block (``group`` not a multiple of ``block``, e.g. 32 with 128)
it fits on slightly stale weights. Here the group's columns always include every update so
far (in-block columns directly, columns past the block with the pending lazy update added),
so the result does not depend on ``block``. For ``block | group`` (the default 128/128, and
per-channel) both agree. Pass ``block=group`` to reproduce AutoGPTQ for smaller groups.

Arithmetic is float64 throughout (the Hessian, its inverse and the error feedback are where
fp32 loses digits). Scales are rounded to fp16 before the integers are chosen (see
:mod:`qconvert.blocks.grid`). The column loop itself runs in a small numba kernel over output rows:
every step of GPTQ is independent per output row once ``Hinv`` is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import QConvertError
from ..blocks.grid import check_bits, dequantize_groupwise, fit_params, n_groups_of


class Hessian:
    """Running ``H = 2/N Σ_t x_t x_tᵀ`` over all calibration tokens seen so far (float64).

    ``add_batch(X)`` takes a layer's inputs ``X`` of shape (tokens, in) (any leading shape is
    flattened) and applies AutoGPTQ's running-average update ``H ← H·n/(n+b)``,
    ``H += (√(2/(n+b))·X)ᵀ(√(2/(n+b))·X)``. AutoGPTQ counts sequences where we count tokens;
    that only rescales ``H`` (GPTQ's result is invariant to it, the reported loss scales).
    """

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.H = np.zeros((self.in_features, self.in_features), dtype=np.float64)
        self.n_tokens = 0

    def add_batch(self, X: np.ndarray) -> "Hessian":
        X = np.asarray(X)
        if X.shape[-1] != self.in_features:
            raise ValueError(f"Hessian for {self.in_features} inputs got a batch of width {X.shape[-1]}")
        X = X.reshape(-1, self.in_features)
        b = X.shape[0]
        if b == 0:
            return self
        self.H *= self.n_tokens / (self.n_tokens + b)
        self.n_tokens += b
        Xs = np.sqrt(2.0 / self.n_tokens) * X.astype(np.float64)
        if not np.isfinite(Xs).all():
            raise QConvertError("calibration activations contain inf or NaN; the model overflows on this data")
        self.H += Xs.T @ Xs
        return self


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`, all in the original (unpermuted) column order.

    ``q`` (out, in) uint8 in ``[0, 2**bits - 1]``; ``scales`` (out, n_groups) float32 holding
    fp16-exact values; ``zeros`` (out, n_groups) int32 (the true zero point, *not* GPTQ v1's
    stored ``zero - 1``); ``g_idx`` (in,) int32, group of each input column; ``perm`` (in,)
    the act-order permutation (position -> original column) or None; ``loss`` the sum over
    columns of ``(w - ŵ)² / (2 Hinv_ii²)``, GPTQ's reported error.
    Dequantize: ``W'[o, i] = scales[o, g_idx[i]] · (q[o, i] − zeros[o, g_idx[i]])``.
    """

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    perm: np.ndarray | None
    loss: float

    def dequantize(self) -> np.ndarray:
        return dequantize_groupwise(self.q, self.scales, self.zeros, self.g_idx)


@njit(cache=True, parallel=True)
def _quantize_columns(W1, Hinv1, Err1, Q1, Losses1, scale_tab, zero_tab, gcol, maxq, start, stop):
    """Columns ``start..stop-1`` of one block, for every output row in parallel.

    ``W1`` (out, count) is the block, updated in place; ``Hinv1`` (count, count) its slice of the
    upper Cholesky factor; column i uses ``scale_tab[:, gcol[i]]`` and ``zero_tab[:, gcol[i]]``.
    """
    out, count = W1.shape
    for r in prange(out):
        for i in range(start, stop):
            s = scale_tab[r, gcol[i]]
            z = zero_tab[r, gcol[i]]
            w = W1[r, i]
            d = Hinv1[i, i]
            q = min(max(np.rint(w / s) + z, 0.0), maxq)
            wq = s * (q - z)
            Q1[r, i] = q
            Losses1[r, i] = (w - wq) ** 2 / d**2 / 2.0
            err = (w - wq) / d
            for j in range(i + 1, count):  # W1[:, i:] -= err ⊗ Hinv1[i, i:]
                W1[r, j] -= err * Hinv1[i, j]
            Err1[r, i] = err


def _inverse_cholesky_upper(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper-triangular U with ``H⁻¹ = Uᵀ U`` (Cholesky of H, its inverse, Cholesky again)."""
    hint = (
        f"GPTQ: the layer's Hessian is not positive definite even after dampening (damp={damp}); "
        "raise the dampening (e.g. --damp 0.1) or use more calibration data"
    )
    try:
        L = np.linalg.cholesky(H)
        Linv = np.linalg.solve(L, np.eye(H.shape[0]))
        Hinv = Linv.T @ Linv
        U = np.linalg.cholesky(Hinv).T
    except np.linalg.LinAlgError:
        raise QConvertError(hint) from None
    if not np.isfinite(U).all():
        raise QConvertError(hint)
    return np.ascontiguousarray(U)


def gptq_quantize(
    W: np.ndarray,
    H: np.ndarray,
    bits: int = 4,
    group: int = 128,
    sym: bool = False,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
) -> GPTQResult:
    """GPTQ-quantize ``W`` (out, in) given the Hessian ``H`` (in, in) of its inputs.

    ``group`` = -1 quantizes per output channel (one group). See the module docstring.
    """
    maxq = check_bits(bits)
    W = np.array(W, dtype=np.float64)  # private copies: both are modified below
    H = np.array(H, dtype=np.float64)
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W (out, in) and H (in, in) disagree: {W.shape} vs {H.shape}")
    if not (np.isfinite(W).all() and np.isfinite(H).all()):
        raise QConvertError("GPTQ: the weight or its Hessian contains inf or NaN")
    if not damp >= 0:
        raise QConvertError(f"--damp must be a non-negative fraction (0.01 is typical), not {damp}")
    if block < 1:
        raise ValueError(f"block must be positive, not {block}")
    out, n = W.shape
    ng = n_groups_of(n, group)
    g = n if group == -1 else group
    static = static_groups and group != -1

    # 2. dead inputs
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale_tab = np.zeros((out, ng), np.float64)
    zero_tab = np.zeros((out, ng), np.float64)
    # 3. static groups: parameters from the unmodified W, in original column order
    if static:
        for k in range(ng):
            scale_tab[:, k], zero_tab[:, k] = fit_params(W[:, k * g : (k + 1) * g], bits, sym, mse)

    # 4. act-order
    perm = None
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
    # group of the column at each (permuted) position
    if static and perm is not None:
        g_pos = perm // g
    else:
        g_pos = np.arange(n) // g

    # 5. dampening, 6. upper Cholesky factor of the inverse
    H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
    Hinv = _inverse_cholesky_upper(H, damp)

    Q = np.zeros((out, n), np.float64)
    Losses = np.zeros((out, n), np.float64)
    # 7. blocks of columns with lazy batched updates
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        count = i2 - i1
        W1 = np.ascontiguousarray(W[:, i1:i2])
        Hinv1 = np.ascontiguousarray(Hinv[i1:i2, i1:i2])
        Err1 = np.zeros((out, count))
        Q1 = np.zeros((out, count))
        Losses1 = np.zeros((out, count))
        gcol = np.ascontiguousarray(g_pos[i1:i2], dtype=np.int64)

        if static:
            _quantize_columns(W1, Hinv1, Err1, Q1, Losses1, scale_tab, zero_tab, gcol, float(maxq), 0, count)
        else:
            i = 0
            while i < count:  # segments of the block that share one group
                col = i1 + i
                stop = min(count, i + g - col % g)
                if col % g == 0:  # group start: fit on the error-updated weights
                    end = min(col + g, n)
                    cols = W1[:, i : min(count, end - i1)]
                    if end > i2:  # the part past the block, with its pending lazy update
                        rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:end]
                        cols = np.concatenate([cols, rest], axis=1)
                    scale_tab[:, col // g], zero_tab[:, col // g] = fit_params(cols, bits, sym, mse)
                _quantize_columns(W1, Hinv1, Err1, Q1, Losses1, scale_tab, zero_tab, gcol, float(maxq), i, stop)
                i = stop

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    # 8. undo the permutation; g_idx of every original column
    g_idx = g_pos.astype(np.int32)
    if perm is not None:
        invperm = np.argsort(perm)
        Q = Q[:, invperm]
        g_idx = g_idx[invperm]
    return GPTQResult(
        q=Q.astype(np.uint8),
        scales=scale_tab.astype(np.float32),
        zeros=zero_tab.astype(np.int32),
        g_idx=np.ascontiguousarray(g_idx, dtype=np.int32),
        perm=perm,
        loss=float(Losses.sum()),
    )
