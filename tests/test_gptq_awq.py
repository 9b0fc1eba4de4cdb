"""GPTQ and AWQ algorithm cores (qconvert.methods.gptq / awq / quantizer) on small random layers."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.errors import QConvertError
from qconvert.methods import awq
from qconvert.methods.gptq import GPTQResult, Hessian, gptq_quantize
from qconvert.blocks.grid import (
    dequantize_groupwise,
    fit_params,
    group_index,
    quantize,
    rtn_groupwise,
)

OUT, IN, TOKENS = 64, 256, 2048


@pytest.fixture(scope="module")
def layer():
    """A (64, 256) weight and correlated calibration inputs: low-rank + noise, uneven channel scales."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((OUT, IN)).astype(np.float32)
    X = rng.standard_normal((TOKENS, 32)) @ rng.standard_normal((32, IN)) + 0.3 * rng.standard_normal((TOKENS, IN))
    X *= np.exp(0.5 * rng.standard_normal(IN))
    X = X.astype(np.float32)
    H = Hessian(IN).add_batch(X[:700]).add_batch(X[700:]).H
    return W, X, H


def out_err(W, W_hat, X):
    return float(np.linalg.norm((W.astype(np.float64) - W_hat) @ X.T.astype(np.float64)))


def rtn_dequant(W, bits, group, sym=False):
    q, s, z = rtn_groupwise(W, bits, group, sym)
    return dequantize_groupwise(q, s, z, group_index(W.shape[1], group))


# ----------------------------------------------------------------------------- quantizer


def test_fit_params_autogptq_semantics():
    x = np.array([[-1.0, 0.5, 2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-3.0, -1.0, -2.0]])
    scale, zero = fit_params(x, 2, sym=False)  # maxq 3; 0 forced into the range
    np.testing.assert_array_equal(scale, [1.0, 1.0, np.float16(2 / 3), 1.0])
    np.testing.assert_array_equal(zero, [1, 0, 2, 3])  # all-zero row: range [-1, 1]
    scale, zero = fit_params(x, 4, sym=True)  # zero = (maxq+1)/2 = 8
    np.testing.assert_array_equal(zero, [8, 8, 8, 8])
    # row 0: max(|-1|, 2) = 2 -> range [-2, 2]; row 1 has no negative: AutoGPTQ keeps xmin = 0
    np.testing.assert_array_equal(scale, np.float16([4 / 15, 3 / 15, 2 / 15, 6 / 15]).astype(np.float64))


def _row_error(x, scale, zero, maxq):
    return (np.abs(scale[:, None] * (quantize(x, scale[:, None], zero[:, None], maxq) - zero[:, None]) - x) ** 2.4).sum(1)


@pytest.mark.parametrize("bits,sym", [(3, False), (4, True), (2, False)])
def test_mse_range_search_against_brute_force(bits, sym):
    """--mse: per row, the shrink p = 1 - i/100 (i < 80) of the min/max range with the lowest
    sum |w' - w|^2.4, first on ties -- checked against a direct loop over every p."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 64)) * 0.02
    x[::3] = rng.laplace(size=(14, 64)) * 0.02  # heavy tails: shrinking pays there
    maxq = 2**bits - 1
    x[5] = np.resize((np.arange(maxq + 1) - 1) * 2.0**-7, 64)  # on the min/max grid: nothing to gain
    s0, z0 = fit_params(x, bits, sym)
    s1, z1 = fit_params(x, bits, sym, mse=True)
    for r in range(x.shape[0]):
        lo, hi = min(x[r].min(), 0), max(x[r].max(), 0)
        if sym:
            hi = max(-lo, hi)
            lo = -hi if lo < 0 else lo
        best = None
        for i in range(80):
            p = 1 - i / 100
            s, z = fit_params(np.array([[p * lo, p * hi]]), bits, sym)  # the range's own params
            e = _row_error(x[r : r + 1], s, z, maxq)[0]
            if best is None or e < best[0]:
                best = (e, s[0], z[0])
        assert (s1[r], z1[r]) == (best[1], best[2]), r
    e0, e1 = _row_error(x, s0, z0, maxq), _row_error(x, s1, z1, maxq)
    assert (e1 <= e0).all() and (e1[::3] < e0[::3]).mean() > 0.5 and e1[::3].sum() < 0.95 * e0[::3].sum()
    if not sym:
        assert e0[5] == e1[5] == 0 and s1[5] == 2.0**-7 and z1[5] == 1


def test_scale_is_fp16_before_integers():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    q, s, z = rtn_groupwise(W, 4, 32, sym=False)
    assert q.dtype == np.uint8 and s.dtype == np.float32 and z.dtype == np.int32 and s.shape == (8, 2)
    np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)  # fp16-exact
    # the integers are the ones nearest under exactly the stored scale
    s16 = s.astype(np.float16).astype(np.float64)
    for k in range(2):
        cols = slice(32 * k, 32 * (k + 1))
        np.testing.assert_array_equal(q[:, cols], quantize(W[:, cols], s16[:, k : k + 1], z[:, k : k + 1], 15))
    # per channel, and a ragged last group
    q, s, z = rtn_groupwise(W, 3, -1, sym=True)
    assert s.shape == (8, 1) and q.max() <= 7
    q, s, z = rtn_groupwise(W, 4, 48, sym=False)
    assert s.shape == (8, 2)
    assert np.abs(dequantize_groupwise(q, s, z, group_index(64, 48)) - W).max() < 0.3


# ----------------------------------------------------------------------------- GPTQ


def test_hessian_running_average(layer):
    _, X, H = layer
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(H, 2 * X64.T @ X64 / TOKENS, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("bits,group,sym,mse", [(4, 128, False, False), (3, 64, True, False), (4, -1, False, False),
                                             (3, 64, False, True), (2, 128, True, True)])
def test_identity_hessian_equals_rtn(bits, group, sym, mse):
    W = np.random.default_rng(2).standard_normal((OUT, IN)).astype(np.float32)
    r = gptq_quantize(W, np.eye(IN), bits=bits, group=group, sym=sym, mse=mse)
    q, s, z = rtn_groupwise(W, bits, group, sym, mse)
    np.testing.assert_array_equal(r.q, q)
    np.testing.assert_array_equal(r.scales, s)
    np.testing.assert_array_equal(r.zeros, z)
    np.testing.assert_array_equal(r.g_idx, group_index(IN, group))
    assert r.perm is None


@pytest.mark.parametrize("bits,max_ratio", [(4, 0.5), (3, 0.4)])
def test_gptq_beats_rtn_on_correlated_inputs(layer, bits, max_ratio):
    W, X, H = layer
    r = gptq_quantize(W, H, bits=bits, group=128)
    e_gptq, e_rtn = out_err(W, r.dequantize(), X), out_err(W, rtn_dequant(W, bits, 128), X)
    assert e_gptq < max_ratio * e_rtn, (e_gptq, e_rtn)
    assert r.q.dtype == np.uint8 and r.q.max() <= 2**bits - 1
    assert r.loss > 0


def test_act_order_and_static_groups(layer):
    W, X, H = layer
    g, ng = 32, IN // 32
    e_rtn = out_err(W, rtn_dequant(W, 4, g), X)

    ao = gptq_quantize(W, H, bits=4, group=g, act_order=True)
    np.testing.assert_array_equal(ao.perm, np.argsort(-np.diag(H), kind="stable"))
    assert ao.g_idx.dtype == np.int32 and ao.g_idx.shape == (IN,)
    np.testing.assert_array_equal(np.bincount(ao.g_idx, minlength=ng), [g] * ng)  # a valid group map
    assert np.any(np.diff(ao.g_idx) < 0)  # non-monotonic under act-order
    np.testing.assert_array_equal(ao.g_idx[ao.perm], np.arange(IN) // g)  # groups follow the permuted order
    assert out_err(W, ao.dequantize(), X) < 0.5 * e_rtn

    st = gptq_quantize(W, H, bits=4, group=g, act_order=True, static_groups=True)
    np.testing.assert_array_equal(st.g_idx, np.arange(IN) // g)  # static groups keep the natural map
    _, s_rtn, z_rtn = rtn_groupwise(W, 4, g, False)
    np.testing.assert_array_equal(st.scales, s_rtn)  # fitted up front on the unmodified W
    np.testing.assert_array_equal(st.zeros, z_rtn)
    assert out_err(W, st.dequantize(), X) < 0.5 * e_rtn


def test_dead_columns(layer):
    W, X, _ = layer
    X = X.copy()
    dead = [3, 100, 255]
    X[:, dead] = 0
    H = Hessian(IN).add_batch(X).H
    for act_order in (False, True):
        r = gptq_quantize(W, H, bits=4, group=64, act_order=act_order)
        Wq = r.dequantize()
        np.testing.assert_array_equal(Wq[:, dead], 0.0)
        assert np.isfinite(r.loss) and np.isfinite(Wq).all()


def test_not_positive_definite_raises():
    W = np.ones((4, 8), np.float32)
    with pytest.raises(QConvertError, match="--damp 0.1"):
        gptq_quantize(W, -np.eye(8), group=-1)


# An independent float64 transcription of the GPTQ loop: no blocks, every update applied at once
# to all later columns, H⁻¹ by direct inversion, its own min/max quantizer.
def _ref_params(x, maxq, sym):
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    both0 = (lo == 0) & (hi == 0)
    lo, hi = np.where(both0, -1.0, lo), np.where(both0, 1.0, hi)
    scale = np.float16(np.clip((hi - lo) / maxq, 2.0**-24, 65504)).astype(np.float64)
    zero = np.full_like(scale, (maxq + 1) // 2) if sym else np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def reference_gptq(W, H, bits, group, sym, damp, act_order, static_groups):
    maxq = 2**bits - 1
    W, H = W.astype(np.float64), H.astype(np.float64).copy()
    n = W.shape[1]
    g = n if group == -1 else group
    d = np.diag(H).copy()
    H[d == 0, d == 0] = 1
    W[:, d == 0] = 0
    groups = [_ref_params(W[:, k : k + g], maxq, sym) for k in range(0, n, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    for i in range(n):
        if static_groups:
            scale, zero = groups[perm[i] // g]
        elif i % g == 0:
            scale, zero = _ref_params(W[:, i : i + g], maxq, sym)
        Q[:, i] = np.clip(np.round(W[:, i] / scale) + zero, 0, maxq)
        err = (W[:, i] - scale * (Q[:, i] - zero)) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    return Q[:, np.argsort(perm)]


@pytest.mark.parametrize(
    "bits,group,sym,act_order,static_groups,block",
    [
        (4, 128, False, False, False, 128),
        (4, 32, False, False, False, 128),  # group starts inside a block
        (3, 48, True, False, False, 64),  # groups straddle blocks, ragged last group
        (4, 32, False, True, False, 128),
        (4, 64, False, True, True, 128),
        (2, -1, False, True, False, 100),
    ],
)
def test_matches_unbatched_reference(layer, bits, group, sym, act_order, static_groups, block):
    W, _, H = layer
    r = gptq_quantize(W, H, bits, group, sym, 0.01, block, act_order, static_groups)
    ref = reference_gptq(W, H, bits, group, sym, 0.01, act_order, static_groups)
    assert np.count_nonzero(r.q != ref) == 0


def test_matches_autogptq_fasterquant_transcription(layer):
    """AutoGPTQ's fasterquant transcribed to torch (float64; its find_params rounds the scale to fp16
    as ours does). Agrees whenever the block size divides the group size."""
    torch = pytest.importorskip("torch")
    W, _, H = layer

    def find_params(x, maxq):  # AutoGPTQ Quantizer.find_params, weight=True, asymmetric
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0], dtype=x.dtype))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0], dtype=x.dtype))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = ((xmax - xmin) / maxq).half().double()
        return scale.unsqueeze(1), torch.round(-xmin.unsqueeze(1) / scale.unsqueeze(1))

    def fasterquant(W, H, bits, blocksize, percdamp, groupsize, actorder):
        maxq = 2**bits - 1
        W, H = W.clone(), H.clone()
        columns = W.shape[1]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        scale, zero = find_params(W, maxq)
        if actorder:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
        Q = torch.zeros_like(W)
        damp = percdamp * torch.mean(torch.diag(H))
        H[torch.arange(columns), torch.arange(columns)] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w, d = W1[:, i], Hinv1[i, i]
                if groupsize != -1 and (i1 + i) % groupsize == 0:
                    scale, zero = find_params(W[:, (i1 + i) : (i1 + i + groupsize)], maxq)
                q = torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq)
                Q1[:, i] = q.flatten()
                err1 = (w - (scale * (q - zero)).flatten()) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        if actorder:
            Q = Q[:, torch.argsort(perm)]
        return Q.numpy()

    Wt, Ht = torch.from_numpy(W.astype(np.float64)), torch.from_numpy(H)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-column ops: threads only add overhead
    try:
        for group, block, actorder in [(128, 128, True), (32, 32, False), (-1, 128, True)]:
            ref = fasterquant(Wt, Ht, 4, block, 0.01, group, actorder)
            ours = gptq_quantize(W, H, bits=4, group=group, block=block, act_order=actorder)
            assert np.count_nonzero(ours.q != ref) == 0, (group, block, actorder)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- AWQ


def rmsnorm(x, w, b=None, eps=1e-6):
    y = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def test_fold_into_norm_and_linear_are_exact():
    rng = np.random.default_rng(3)
    d, h = 32, 48
    x = rng.standard_normal((10, d)).astype(np.float32)
    s = np.exp(rng.standard_normal(d)).astype(np.float32)
    g, b = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32), (0.1 * rng.standard_normal(d)).astype(np.float32)
    Wq, Wk = (rng.standard_normal((h, d)).astype(np.float32) for _ in range(2))
    g2, b2, (Wq2, Wk2) = awq.fold_into_norm(g, b, [Wq, Wk], s)
    for W, W2 in ((Wq, Wq2), (Wk, Wk2)):
        np.testing.assert_allclose(rmsnorm(x, g2, b2) @ W2.T, rmsnorm(x, g, b) @ W.T, rtol=1e-5, atol=1e-5)
    g3, none, _ = awq.fold_into_norm(g, None, [Wq], s)
    assert none is None and g3.dtype == np.float32

    # linear -> linear (up -> down), and a fused qkv whose last rows feed o_proj
    W1, b1 = rng.standard_normal((d, h)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    W2 = rng.standard_normal((h, d)).astype(np.float32)
    xin = rng.standard_normal((10, h)).astype(np.float32)
    p, pb, (n2,) = awq.fold_into_linear(W1, b1, [W2], s)
    np.testing.assert_allclose((xin @ p.T + pb) @ n2.T, (xin @ W1.T + b1) @ W2.T, rtol=1e-5, atol=1e-4)
    qkv = rng.standard_normal((3 * d, h)).astype(np.float32)
    p, _, (n2,) = awq.fold_into_linear(qkv, None, [W2], s)
    np.testing.assert_array_equal(p[: 2 * d], qkv[: 2 * d])
    np.testing.assert_allclose((xin @ p[2 * d :].T) @ n2.T, (xin @ qkv[2 * d :].T) @ W2.T, rtol=1e-5, atol=1e-4)


def test_pseudo_quantize_autoawq_formula():
    W = np.array([[-0.75, 0.3, 0.375, 3.0], [1.0, 2.0, 3.0, 4.75]], np.float32)
    wq, q, scales, zeros = awq.pseudo_quantize(W, bits=4, group=4)
    # row 0: scale = 3.75/15 = 0.25, zero = -round(-3) = 3; 0.3/0.25 = 1.2 -> 1, 0.375/0.25 = 1.5 -> 2 (half-even)
    # row 1: min > 0 is not widened to 0: scale 0.25, zero = clamp(-round(4), 0, 15) = 0; 4.75/0.25 = 19 -> 15
    np.testing.assert_array_equal(scales, [[0.25], [0.25]])
    np.testing.assert_array_equal(zeros, [[3], [0]])
    np.testing.assert_array_equal(q, [[0, 4, 5, 15], [4, 8, 12, 15]])
    np.testing.assert_array_equal(wq, [[-0.75, 0.25, 0.5, 3.0], [1.0, 2.0, 3.0, 3.75]])
    assert q.dtype == np.uint8 and zeros.dtype == np.int32
    # scale rounded to fp16 before the integers: range 1 -> 1/15 is not an fp16 value
    _, _, s, _ = awq.pseudo_quantize(np.array([[0.0, 1.0]], np.float32), bits=4, group=2)
    assert s[0, 0] == np.float32(np.float16(1 / 15)) != np.float32(1 / 15)
    # all-equal group: the range is clamped to 1e-5
    _, _, s, z = awq.pseudo_quantize(np.zeros((1, 4), np.float32), bits=4, group=4, fp16_scales=False)
    assert s[0, 0] == np.float32(1e-5 / 15) and z[0, 0] == 0
    # symmetric variant: scale = max|w| / 7, q in [-8, 7]
    wq, q, s, z = awq.pseudo_quantize(np.array([[-7.0, 3.4, 7.0, 0.5]], np.float32), bits=4, group=4, zero_point=False)
    assert z is None and s[0, 0] == 1.0
    np.testing.assert_array_equal(q, [[-7, 3, 7, 0]])
    with pytest.raises(QConvertError, match="multiple"):
        awq.pseudo_quantize(np.zeros((2, 10), np.float32), 4, 4)


def test_statistics():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((3, 50, 16)).astype(np.float32)
    np.testing.assert_allclose(awq.activation_stats(X, chunk_tokens=7), np.abs(X).reshape(-1, 16).mean(0), rtol=1e-6)
    W = rng.standard_normal((6, 16))
    a = np.abs(W).reshape(6, 2, 8)
    expect = (a / (a.max(-1, keepdims=True) + 1e-6)).reshape(6, 16).mean(0)
    np.testing.assert_allclose(awq.weight_stats(W, 8), expect, rtol=1e-6)


def awq_layer(salient: bool):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((96, 128)).astype(np.float32)
    X = rng.standard_normal((512, 128)).astype(np.float32)
    if salient:
        X[:, [5, 40, 77, 120]] *= 30.0
    return W, X


def test_search_scale_uniform_activations_keeps_alpha_zero():
    W, X = awq_layer(salient=False)
    x_mean = np.ones(128, np.float32)  # perfectly uniform: every s is all ones, every loss equal
    s, ratio, losses = awq.search_scale(x_mean, awq.weight_stats(W, 64), awq.linear_group_loss(X, [W], 4, 64), duo_scaling=False)
    assert ratio == 0.0 and len(losses) == 20 and len(set(losses)) == 1
    np.testing.assert_array_equal(s, 1.0)


def test_search_scale_protects_salient_channels():
    W, X = awq_layer(salient=True)
    Wv = np.random.default_rng(6).standard_normal((32, 128)).astype(np.float32)  # a second linear on the same input
    loss = awq.linear_group_loss(X, [W, Wv], 4, 64)
    w_mean = awq.weight_stats(np.concatenate([W, Wv]), 64)
    for duo in (True, False):
        s, ratio, losses = awq.search_scale(awq.activation_stats(X), w_mean, loss, duo_scaling=duo)
        assert ratio > 0.0 and losses[int(round(ratio * 20))] == min(losses)
        assert min(losses) < 0.8 * losses[0], losses
        assert s[[5, 40, 77, 120]].min() > np.median(s)  # salient channels scaled up
    # the folded, quantized layer is better than quantizing the unscaled weight
    s, ratio, _ = awq.search_scale(awq.activation_stats(X), w_mean, loss)
    x_folded, W_folded = X / s, W * s
    err_awq = np.linalg.norm(x_folded @ awq.pseudo_quantize(W_folded, 4, 64)[0].T - X @ W.T)
    err_rtn = np.linalg.norm(X @ awq.pseudo_quantize(W, 4, 64)[0].T - X @ W.T)
    assert err_awq < 0.8 * err_rtn


def test_search_clip_lowers_output_error():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((128, 256)).astype(np.float32)
    X = rng.standard_normal((2048, 256)).astype(np.float32)
    ref = X @ W.T
    org_max = np.abs(W.reshape(128, 4, 64)).max(-1)
    for bits, max_ratio in ((4, 0.98), (3, 0.92)):  # measured 0.945 and 0.865
        max_val = awq.search_clip(W, X, bits=bits, group=64)
        assert max_val.shape == (128, 4)
        assert np.all(max_val <= org_max) and np.all(max_val >= 0.55 * org_max - 1e-6)  # i/20, i < 10
        assert np.any(max_val < org_max)
        Wc = awq.apply_clip(W, max_val)
        assert np.all(np.abs(Wc.reshape(128, 4, 64)) <= max_val[:, :, None])
        err_clip = np.mean((X @ awq.pseudo_quantize(Wc, bits, 64)[0].T - ref) ** 2)
        err_plain = np.mean((X @ awq.pseudo_quantize(W, bits, 64)[0].T - ref) ** 2)
        assert err_clip < max_ratio * err_plain, (bits, err_clip, err_plain)


def test_gptq_result_type(layer):
    W, _, H = layer
    r = gptq_quantize(W, H, bits=4, group=64)
    assert isinstance(r, GPTQResult)
    assert r.scales.shape == (OUT, 4) and r.zeros.shape == (OUT, 4) and r.scales.dtype == np.float32


def test_awq_search_windows_budget():
    from qconvert.steps import AWQ_SEARCH_TOKENS, search_windows

    assert AWQ_SEARCH_TOKENS == 4096
    assert search_windows(32, 512) == 8 and search_windows(16, 256) == 16
    assert search_windows(4, 512) == 4 and search_windows(3, 5000) == 1 and search_windows(10, 300) == 10
    assert search_windows(100, 300, budget=1000) == 4
