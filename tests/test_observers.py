"""Calibration observers on synthetic distributions with known answers.

The entropy and mse searches are checked against brute-force numpy ports of TensorRT's
``_compute_amax_entropy`` / ``_compute_amax_mse`` run on the very same histogram, so any
difference is the search itself, not binning.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qconvert.errors import QConvertError
from qconvert.observers import (
    EntropyObserver,
    MseObserver,
    PercentileObserver,
    clip_weights,
    make_observer,
)

N = 1_000_000
NAMES = ("minmax", "percentile", "entropy", "mse")


def observe(name, x, **options):
    obs = make_observer(name, **options)
    obs.update(x)
    return obs


@pytest.fixture(scope="module")
def uniform():
    return np.random.default_rng(1).uniform(-1, 1, N).astype(np.float32)


@pytest.fixture(scope="module")
def gauss_outliers():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(N)
    x[rng.choice(N, 3, replace=False)] = [60.0, -55.0, 58.0]
    return x


@pytest.fixture(scope="module")
def laplace():
    return np.random.default_rng(3).laplace(0.0, 1.0, N)


# ---------------------------------------------------------------- brute-force references


def kl(p, q):
    """KL(p||q) of unnormalised histograms, as scipy.stats.entropy(p, q)."""
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    if np.any(q[m] == 0):
        return math.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def trt_entropy_index(counts, bits=8, start_bin=128):
    """A literal numpy port of TensorRT's KL search: (chosen i, its KL)."""
    bins = counts.astype(np.float64).copy()
    bins[0] = bins[1]
    nq = 1 << (bits - 1)
    divs, args = [], []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=nq + 1)
        dig = np.digitize(np.arange(i), space) - 1
        dig[bins[:i] == 0] = -1
        ok = dig >= 0
        gsum = np.bincount(dig[ok], weights=bins[:i][ok], minlength=nq)
        gcnt = np.bincount(dig[ok], minlength=nq)
        q = np.zeros(i)
        q[ok] = gsum[dig[ok]] / gcnt[dig[ok]]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        divs.append(kl(p, q))
        args.append(i)
    divs = np.array(divs)
    last = len(divs) - 1 - int(np.argmin(divs[::-1]))
    return args[last], divs[last]


def trt_mse_index(counts, edges, bits=8, start_bin=128):
    """A literal numpy port of TensorRT's MSE search: (chosen centre index, its error)."""
    centers = (edges[1:] + edges[:-1]) / 2
    bound = (1 << (bits - 1)) - 1
    mses = []
    for i in range(start_bin, len(centers)):
        scale = bound / centers[i]
        qc = np.clip(np.round(centers * scale), -bound, bound) / scale
        mses.append(np.mean((qc - centers) ** 2 * counts))
    j = int(np.argmin(mses))
    return start_bin + j, mses[j]


# ---------------------------------------------------------------- known answers


def test_uniform(uniform):
    amax = float(np.abs(uniform).max())
    assert observe("minmax", uniform).threshold() == amax
    assert abs(amax - 1) < 1e-5

    p = observe("percentile", uniform)
    # the 99.99th percentile of |U(-1,1)| is 0.9999; we report the lower edge of its bin
    assert 0.9999 - 2 * p.bin_width <= p.threshold() <= 0.9999 + p.bin_width
    assert p.bin_width == 2.0**-12  # 2048 * 2**-12 <= max|x| < 1 -> 4096 bins of 2**-12

    # Entropy: the histogram is flat, so q equals p except where clipping folds the tail mass f
    # into the last bin; that costs about f*log(f*n) (~0.04 for f = 1%), twenty times the KL
    # that sampling noise alone gives (~n_bins/(2N) = 0.002). So the search keeps (nearly) all.
    assert observe("entropy", uniform).threshold() >= 0.99

    # MSE: for |x| ~ U(0,1), E(c) = (1-c)^3/3 + c^3/(12*127^2) is minimal at c = 254/255
    # = 0.99608; the histogram search sees bin centres (+-1 bin) and sampling noise is tiny
    # because E is dominated by the rounding term averaged over all N values.
    assert abs(observe("mse", uniform).threshold() - 254 / 255) < 4 * 2.0**-12


def test_gaussian_with_rare_outliers(gauss_outliers):
    t = {name: observe(name, gauss_outliers).threshold() for name in NAMES}
    assert t["minmax"] == 60.0
    # |N(0,1)| exceeds 3.89 with probability 1e-4: the percentile sits there (+- a few bins)
    assert 3.8 < t["percentile"] < 4.0
    # entropy ignores the three outliers and lands a little above the Gaussian's bulk
    assert 3.5 < t["entropy"] < 8.0
    # mse trades rounding error of the bulk (step amax/127) against the outliers' clipping
    # error: with 3 outliers at ~60 it keeps part of them but still clips well below
    assert 5.0 < t["mse"] < 30.0


def test_laplace_entropy_matches_bruteforce(laplace):
    obs = observe("entropy", laplace)
    counts, edges = obs.histogram()
    i_ref, kl_ref = trt_entropy_index(counts)
    i, kl_ours = obs.search_index(counts)
    assert i == i_ref
    assert kl_ours == pytest.approx(kl_ref, rel=1e-9, abs=1e-12)
    assert obs.threshold() == min(edges[i_ref], np.abs(laplace).max())
    # For Laplace(b=1) and 1e6 samples the 8-bit KL threshold falls around 10-11.5 b (seeds
    # 0..3 give 10.2 .. 11.3); it depends on the sample max through the histogram range.
    assert 9.0 < obs.threshold() < 12.5


def test_laplace_mse_matches_bruteforce(laplace):
    obs = observe("mse", laplace)
    counts, edges = obs.histogram()
    i_ref, err_ref = trt_mse_index(counts, edges)
    i, err = obs.search_index(counts)
    assert i == i_ref
    w = obs.bin_width
    assert err * w * w / counts.size == pytest.approx(err_ref, rel=1e-9)
    assert obs.threshold() == (i_ref + 0.5) * w
    assert 8.5 < obs.threshold() < 11.0


def test_bruteforce_other_bits(laplace):
    counts, edges = observe("entropy", laplace[:50_000]).histogram()
    for bits in (4, 6):
        ent = EntropyObserver()
        mse = MseObserver()
        assert ent.search_index(counts, bits)[0] == trt_entropy_index(counts, bits)[0]
        assert mse.search_index(counts, bits)[0] == trt_mse_index(counts, edges, bits)[0]
    # fewer bits -> more clipping
    t = [observe("mse", laplace).threshold(bits) for bits in (4, 6, 8)]
    assert t[0] < t[1] < t[2]


def test_percentile_option(laplace):
    a = np.sort(np.abs(laplace))
    for p in (99.0, 99.9, 99.99):
        obs = observe("percentile", laplace, percentile=p)
        # q = the smallest sample with a fraction >= p/100 of the data at or below it (p*N is
        # an integer here; np.quantile(method="inverted_cdf") rounds p*N up to 999000 + 1e-10);
        # the threshold is the lower edge of the bin that holds q
        q = a[round(p / 100 * N) - 1]
        assert q - obs.bin_width < obs.threshold() <= q
    assert observe("percentile", laplace, percentile=100).threshold() == a.max()


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("order", ["shuffled", "growing"])
def test_streaming_equals_one_shot(laplace, order):
    """Bit-identical histograms (power-of-two bins merge exactly) -> identical thresholds."""
    x = laplace[:200_000] * 1e-3
    x[:5] *= 1e5  # a wide dynamic range, so chunks regrid by many octaves
    if order == "growing":  # worst case: every chunk has a larger max -> re-binning each time
        x = x[np.argsort(np.abs(x))]
    chunks = np.array_split(x, 10)
    for name in NAMES:
        one = observe(name, x)
        many = make_observer(name)
        for c in chunks:
            many.update(c.reshape(-1, 4) if c.size % 4 == 0 else c)
        if name != "minmax":
            assert np.array_equal(one.histogram()[0], many.histogram()[0])
            assert one.bin_width == many.bin_width
        for bits in (4, 8):
            assert one.threshold(bits) == many.threshold(bits)
            assert one.range(bits) == many.range(bits)


def test_streaming_zeros_first_and_float32():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(10_000).astype(np.float32)
    obs = make_observer("entropy")
    obs.update(np.zeros((3, 7), np.float32))
    obs.update(x[:5000])
    obs.update(x[5000:])
    ref = observe("entropy", np.concatenate([np.zeros(21, np.float32), x]))
    assert np.array_equal(obs.histogram()[0], ref.histogram()[0])
    assert obs.threshold() == ref.threshold()
    assert observe("mse", np.zeros(10)).threshold() == 0.0


def test_extreme_magnitudes():
    """Tiny and huge scales (subnormal widths, widths near the float max) stay exact and finite."""
    x = np.random.default_rng(8).laplace(size=20_000)
    for scale in (1e-310, 1e-30, 1e30, 1e305):
        y = x * (scale / np.abs(x).max())
        for name in ("percentile", "entropy", "mse"):
            one = observe(name, y)
            many = make_observer(name)
            for c in np.array_split(y[np.argsort(np.abs(y))], 7):  # growing: regrids
                many.update(c)
            t = one.threshold()
            assert 0 < t <= np.abs(y).max() and math.isfinite(t)
            assert many.threshold() == t
    big = np.array([3.0e38, -3.4e38, 1.0], np.float32)
    assert observe("mse", big).threshold() <= 3.4e38
    all_neg = -np.abs(x)
    for name in NAMES:
        lo, hi = observe(name, all_neg).range()
        assert hi == 0.0 and all_neg.min() <= lo < 0


# ---------------------------------------------------------------- asymmetric ranges


def test_ranges():
    rng = np.random.default_rng(6)
    relu = np.maximum(rng.standard_normal(100_000), 0)
    for name in NAMES:
        lo, hi = observe(name, relu).range(8)
        assert lo == 0.0 and 0 < hi <= relu.max()
    x = np.concatenate([rng.uniform(-1, 0, 50_000), rng.uniform(0, 3, 50_000)])
    assert observe("minmax", x).range() == (x.min(), x.max())
    lo, hi = observe("percentile", x, percentile=99.0).range()
    # cuts 0.5% of all mass from each tail: x < lo for 0.5% -> lo ~ -0.99, hi ~ 2.97
    assert lo == pytest.approx(-0.99, abs=0.01) and hi == pytest.approx(2.97, abs=0.01)
    for name in ("entropy", "mse"):
        lo, hi = observe(name, x).range()
        assert -1.0 <= lo < -0.9 and 2.7 < hi <= 3.0
        t = observe(name, x)
        assert t.range(8, symmetric=True) == (-t.threshold(8), t.threshold(8))


# ---------------------------------------------------------------- weight clipping


def _rtn_err(W, c, bits=4, group=None):
    maxq = (1 << (bits - 1)) - 1
    Wc = np.clip(W, -c[:, None], c[:, None])
    if group is None:
        s = c[:, None] / maxq
        return ((np.rint(Wc / s) * s - W) ** 2).sum()
    g = Wc.reshape(W.shape[0], -1, group)
    s = np.abs(g).max(axis=2, keepdims=True) / maxq
    return ((np.rint(g / s) * s - W.reshape(g.shape)) ** 2).sum()


def test_weight_clipping_reduces_error():
    rng = np.random.default_rng(7)
    W = rng.standard_t(df=3, size=(64, 512)) * 0.02  # heavy-tailed rows
    amax = np.abs(W).max(axis=1)
    assert np.array_equal(clip_weights(W, "minmax"), amax)
    # 4 bits: clipping the t(3) tails pays a lot (~30% less error); 8 bits: the grid is already
    # fine, so the gain is small (~0.4%) but must still be a gain
    for bits, gain in ((4, 0.8), (8, 1.0)):
        c = clip_weights(W, "mse", bits)
        assert c.shape == (64,) and np.all(c <= amax) and np.all(c >= 0.2 * amax - 1e-15)
        assert _rtn_err(W, c, bits) < gain * _rtn_err(W, amax, bits)
        # plain squared error (norm=2) is what _rtn_err measures: at least as good per row
        c2 = clip_weights(W, "mse", bits, norm=2)
        assert _rtn_err(W, c2, bits) <= _rtn_err(W, c, bits) + 1e-15
    cg = clip_weights(W, "mse", 4, group=32)
    assert _rtn_err(W, cg, 4, 32) < _rtn_err(W, amax, 4, 32)
    assert np.all(cg >= clip_weights(W, "mse", 4))  # per-block scales clip less
    # percentile per row, and the axis argument (columns of W.T are W's rows)
    cp = clip_weights(W, "percentile", 4, percentile=99.0)
    assert np.array_equal(cp, clip_weights(W.T, "percentile", 4, axis=1, percentile=99.0))
    assert np.all(cp < amax)
    # a custom quantizer: identity -> no error anywhere -> no clipping
    assert np.array_equal(clip_weights(W, "mse", quantize=lambda a: a), amax)


# ---------------------------------------------------------------- errors


def test_errors():
    for bad in (np.nan, np.inf, -np.inf):
        for name in NAMES:
            with pytest.raises(QConvertError, match="NaN or infinite"):
                make_observer(name).update(np.array([1.0, bad], np.float32))
    with pytest.raises(QConvertError, match="unknown observer 'kld'"):
        make_observer("kld")
    with pytest.raises(QConvertError, match="no option percentile"):
        make_observer("entropy", percentile=99.9)
    with pytest.raises(QConvertError, match="percentile must be"):
        make_observer("percentile", percentile=0)
    with pytest.raises(QConvertError, match="num_bins"):
        make_observer("mse", num_bins=4)
    with pytest.raises(QConvertError, match="seen no data"):
        make_observer("entropy").threshold()
    with pytest.raises(QConvertError, match="bits"):
        observe("minmax", np.ones(3)).threshold(bits=1)
    with pytest.raises(QConvertError, match="dtype"):
        make_observer("minmax").update(np.ones(3, np.complex64))
    with pytest.raises(QConvertError, match="NaN or infinite"):
        clip_weights(np.array([[1.0, np.nan]]), "mse")
    with pytest.raises(QConvertError, match="unknown weight clip"):
        clip_weights(np.ones((2, 2)), "kld")
    with pytest.raises(QConvertError, match="group 5"):
        clip_weights(np.ones((2, 32)), "mse", group=5)
    assert isinstance(make_observer("KL"), EntropyObserver)
    assert isinstance(make_observer("percentile", percentile=99.9), PercentileObserver)
