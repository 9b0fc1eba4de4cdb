"""Calibration range observers: minmax, percentile, entropy (KL) and mse.

An observer watches a stream of arrays (activations of one tensor over calibration batches, or
one weight matrix) and then answers "what range should the quantizer cover?"::

    obs = make_observer("entropy")          # or "minmax", "percentile", "mse"
    for batch in batches:
        obs.update(activations(batch))      # any shape; NaN/inf raise QConvertError
    amax = obs.threshold(bits=8)            # symmetric: quantize over [-amax, amax]
    lo, hi = obs.range(bits=8, symmetric=False)   # asymmetric (always contains 0)

The algorithms follow the two public references (see shared/reference/ANCHORS.md, section C6):

- ``minmax``: the largest ``|x|`` seen (``range``: observed min and max, widened to contain 0).
- ``percentile`` (TensorRT ``_compute_amax_percentile``, onnxruntime ``compute_percentile``):
  CDF of the ``|x|`` histogram; amax = the lower edge of the first bin where the CDF reaches
  ``p/100`` (default ``p = 99.99``), so amax is at most one bin width below the true quantile.
  Asymmetric: ``(100 - p)/200`` of the mass is cut from each tail of the signed histogram.
- ``entropy`` (TensorRT ``_compute_amax_entropy``, Migacz GTC 2017): on the ``|x|`` histogram
  (with ``bins[0] := bins[1]``), for every candidate ``i >= 128`` bins: reference ``p`` =
  the first ``i`` bins with all the mass beyond folded into bin ``i-1``; candidate ``q`` = the
  first ``i`` bins merged into ``2**(bits-1)`` groups (group of bin ``j`` = ``floor(j*nq/i)``),
  each group's mass spread evenly over its non-empty bins; ``KL(p||q)``; the **last** argmin
  wins and amax = the bin edge ``i * width``. As in TensorRT, a candidate whose last bin is
  empty but receives outlier mass gets ``KL = inf`` (q is 0 where p is not).
- ``mse`` (TensorRT ``_compute_amax_mse``): candidate amax = each bin centre from bin 128 up;
  fake-quantize all bin centres with that amax (round half to even, ``2**(bits-1) - 1`` levels,
  clamped); error = ``sum(count * (Q(c) - c)**2)``; the first argmin wins.

Entropy and mse thresholds are clipped to the observed max (onnxruntime does the same for
entropy), because the top histogram edge may lie above it (see the grid below).

**The histogram grid.** Counts of ``|x|`` go into bins of width ``w = 2**k``, the largest
power of two with ``num_bins * w <= max|x|``; the histogram covers ``[0, n*w)`` with
``n = floor(max|x| / w) + 1``, i.e. between ``num_bins + 1`` and ``2 * num_bins`` bins (default
2049..4096 bins, never coarser than TensorRT's 2048). When a larger value arrives the range is
extended with more bins of the same width, and when the width must grow it doubles (or
quadruples ...), merging 2 (4, ...) old bins into one new bin. This is TensorRT's
"keep the width, append bins" growth, plus exact merging so the bin count stays bounded
(TensorRT's append-only scheme can grow without limit when the first batch is small). Why
power-of-two widths: ``floor(|x| / w)`` is then computed exactly, and merging is exact
(``floor(floor(|x|/w)/2) == floor(|x|/(2w))``), so the final histogram depends only on the
multiset of values, never on how it was split into batches or in which order they came:
streaming in 10 chunks gives bit-for-bit the same histogram, hence the same threshold, as one
call (``tests/test_observers.py`` checks this). Negative and positive values are counted in two
histograms on the same grid (the ``|x|`` histogram is their sum) so that asymmetric ranges
remain available.

``range(bits, symmetric=False)`` for entropy and mse searches each side of zero separately:
one-signed data (e.g. after a ReLU) is searched with ``2**bits - 1`` levels (TensorRT's
``unsigned=True``); data with both signs gets ``2**(bits-1) - 1`` levels per side. That is a
cheap heuristic (a joint search over both ends would be exact), documented as such.

``clip_weights`` gives per-row clip thresholds for weight matrices (RTN ``--weight-clip``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from numba import njit, prange

from .errors import QConvertError

__all__ = [
    "EntropyObserver",
    "MinMaxObserver",
    "MseObserver",
    "OBSERVERS",
    "Observer",
    "PercentileObserver",
    "clip_weights",
    "make_observer",
]

_MIN_EXP = -1022  # the smallest normal power of two; its inverse 2**1022 is still finite


# --------------------------------------------------------------------------- numba kernels


@njit(cache=True)
def _scan(x):
    """(min, max, all finite) of a 1-D float array, in one pass."""
    lo = np.inf
    hi = -np.inf
    ok = True
    for v in x:
        if not np.isfinite(v):
            ok = False
            break
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return float(lo), float(hi), ok


@njit(cache=True)
def _accumulate(x, inv_w, pos, neg):
    """Count x into bins of width 1/inv_w: x >= 0 into pos[floor(x*inv_w)], x < 0 into neg.

    inv_w is a power of two, so ``v * inv_w`` is exact and the bin index is exact.
    """
    for v in x:
        d = np.float64(v)
        if d >= 0.0:
            pos[np.int64(d * inv_w)] += 1
        else:
            neg[np.int64(-d * inv_w)] += 1


@njit(cache=True)
def _entropy_index(bins, nq, start, stride):
    """TensorRT's KL search on a histogram of |x| (float64, already with bins[0] = bins[1]).

    Returns (i, kl): the number of bins of the chosen threshold (the last argmin) and its KL;
    i = -1 when there is no candidate (fewer bins than ``start``).
    """
    n = bins.shape[0]
    total = 0.0
    for j in range(n):
        total += bins[j]
    if total <= 0.0:
        return -1, np.inf
    tail = np.zeros(n + 1)  # tail[i] = sum(bins[i:])
    for j in range(n - 1, -1, -1):
        tail[j] = tail[j + 1] + bins[j]
    logb = np.zeros(n)
    for j in range(n):
        if bins[j] > 0.0:
            logb[j] = math.log(bins[j])
    log_total = math.log(total)
    best_i = -1
    best = np.inf
    for i in range(start, n + 1, stride):
        outliers = tail[i]
        head = total - outliers  # mass of bins[:i] = sum of q before normalisation
        # sum over j of p_j * (log p_j - log q_j), with p = bins[:i] (+ outliers in the last bin)
        acc = 0.0
        finite = True
        for g in range(nq):
            j0 = (g * i + nq - 1) // nq  # bins j with floor(j * nq / i) == g
            j1 = ((g + 1) * i + nq - 1) // nq
            if j1 > i:
                j1 = i
            s = 0.0
            cnt = 0
            for j in range(j0, j1):
                if bins[j] > 0.0:
                    s += bins[j]
                    cnt += 1
            if cnt == 0:
                if j1 == i and j1 > j0 and outliers > 0.0:
                    finite = False  # the last bin holds outliers but q is 0 there
                    break
                continue
            logq = math.log(s / cnt)
            for j in range(j0, j1):
                b = bins[j]
                if j == i - 1 and outliers > 0.0:
                    p = b + outliers
                    if b == 0.0:
                        finite = False
                        break
                    acc += p * (math.log(p) - logq)
                elif b > 0.0:
                    acc += b * (logb[j] - logq)
            if not finite:
                break
        if finite:
            # KL(p/P || q/Q) = (1/P) sum p (log p - log q) + log(Q/P), P = total, Q = head
            kl = acc / total + math.log(head) - log_total
        else:
            kl = np.inf
        if kl <= best:  # "<=": the last argmin, as TensorRT
            best = kl
            best_i = i
    return best_i, best


@njit(cache=True)
def _mse_index(counts, max_bound, start, stride):
    """TensorRT's MSE search in units of the bin width: centres c_k = k + 0.5.

    Returns (i, err): the centre index of the chosen amax (first argmin) and its error;
    i = -1 when there is no candidate.
    """
    n = counts.shape[0]
    best_i = -1
    best = np.inf
    for i in range(start, n, stride):
        scale = max_bound / (i + 0.5)
        err = 0.0
        for k in range(n):
            c = counts[k]
            if c == 0:
                continue
            x = k + 0.5
            q = np.rint(x * scale)  # round half to even, as torch.round
            if q > max_bound:
                q = max_bound
            d = q / scale - x
            err += c * d * d
        if err < best:
            best = err
            best_i = i
    return best_i, best


@njit(cache=True, parallel=True)
def _clip_search_rows(rows, amax, maxq, norm, grid, nsteps, group):
    """Per row: the clip c = amax*(1 - i/grid), i < nsteps, minimising sum |Q(clip(w)) - w|**norm.

    Q is symmetric RTN with scale = c/maxq (group == 0) or max|clip(w)|/maxq per ``group``
    consecutive weights. Exact ties keep the smaller i. Rows run in parallel.
    """
    R, C = rows.shape
    out = amax.copy()
    square = norm == 2.0
    g = C if group == 0 else group
    for r in prange(R):
        best = np.inf
        for i in range(nsteps):
            c = amax[r] * (1.0 - i / grid)
            err = 0.0
            for g0 in range(0, C, g):
                if group == 0:
                    s = c / maxq
                else:
                    gm = 0.0
                    for j in range(g0, g0 + g):
                        a = min(abs(rows[r, j]), c)
                        if a > gm:
                            gm = a
                    s = gm / maxq
                if s == 0.0:
                    s = 1.0
                for j in range(g0, g0 + g):
                    w = rows[r, j]
                    v = min(max(w, -c), c)
                    d = abs(np.rint(v / s) * s - w)
                    err += d * d if square else d**norm
            if err < best:
                best = err
                out[r] = c
    return out


# --------------------------------------------------------------------------- helpers


def _as_float_1d(x) -> np.ndarray:
    a = np.asarray(x)
    kind = a.dtype.kind
    if kind == "f":
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
    elif kind in "iub":
        a = a.astype(np.float64)
    else:
        raise QConvertError(f"an observer needs real numbers, not an array of dtype {a.dtype}")
    return np.ascontiguousarray(a).reshape(-1)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise QConvertError(f"bits must be an integer from 2 to 16, not {bits!r}")
    return int(bits)


def _grid_exponent(m: float, num_bins: int) -> int:
    """The largest k with num_bins * 2**k <= m (m > 0), at least _MIN_EXP. Monotone in m."""

    def fits(k: int) -> bool:
        try:
            return math.ldexp(num_bins, k) <= m
        except OverflowError:
            return False

    k = math.frexp(m / num_bins)[1] - 1
    while k > _MIN_EXP and not fits(k):
        k -= 1
    while fits(k + 1):
        k += 1
    return max(k, _MIN_EXP)


def _max_bound(bits: int, unsigned: bool) -> int:
    return (1 << (bits - 1 + int(unsigned))) - 1


def _first_reaching(counts: np.ndarray, fraction: float) -> int:
    """The first bin where the CDF reaches ``fraction`` (TensorRT: searchsorted(cdf, p)).

    Integer cumulative counts against ``fraction * total`` (with a 1e-12 relative slack for
    the rounding of ``fraction`` itself) instead of TensorRT's float ``cumsum(hist / total)``,
    whose rounding can skip the bin where the CDF reaches p exactly.
    """
    cum = np.cumsum(counts)
    target = fraction * float(cum[-1]) * (1.0 - 1e-12)
    return min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)


# --------------------------------------------------------------------------- observers


class Observer:
    """Base: tracks min/max and checks the data. Subclasses define the threshold search."""

    name = "observer"
    _options: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def _scan(self, x) -> np.ndarray:
        a = _as_float_1d(x)
        if a.size == 0:
            return a
        lo, hi, ok = _scan(a)
        if not ok:
            raise QConvertError(
                f"the {self.name} observer got NaN or infinite values; calibration data must be finite"
            )
        self.count += a.size
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        return a

    def update(self, x: np.ndarray) -> None:
        self._scan(x)

    @property
    def amax(self) -> float:
        """The largest |x| observed so far."""
        self._need_data()
        return max(-self.min, self.max)

    def _need_data(self) -> None:
        if self.count == 0:
            raise QConvertError(f"the {self.name} observer has seen no data; call update() first")

    def threshold(self, bits: int = 8, symmetric: bool = True) -> float:
        """amax for a quantizer over [-amax, amax] (symmetric), or max(-lo, hi) of ``range``."""
        if not symmetric:
            lo, hi = self.range(bits, symmetric=False)
            return max(-lo, hi)
        _check_bits(bits)
        self._need_data()
        return self._threshold(bits)

    def range(self, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
        """(lo, hi) to quantize over; always contains 0. Symmetric: (-amax, amax)."""
        if symmetric:
            t = self.threshold(bits, symmetric=True)
            return -t, t
        _check_bits(bits)
        self._need_data()
        lo, hi = self._range(bits)
        return min(lo, 0.0), max(hi, 0.0)

    def _threshold(self, bits: int) -> float:
        return self.amax

    def _range(self, bits: int) -> tuple[float, float]:
        return self.min, self.max

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._options)
        return f"{type(self).__name__}({opts})"


class MinMaxObserver(Observer):
    """The largest |x| (symmetric) or the observed [min, max] (asymmetric)."""

    name = "minmax"


class HistogramObserver(Observer):
    """Streams |x| into a growable power-of-two-width histogram (see the module docstring)."""

    def __init__(self, num_bins: int = 2048) -> None:
        super().__init__()
        if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 16:
            raise QConvertError(f"num_bins must be an integer >= 16, not {num_bins!r}")
        self.num_bins = int(num_bins)
        self._exp: int | None = None  # bin width = 2**_exp; None while only zeros were seen
        self._pos = np.zeros(0, np.int64)  # counts of x >= 0
        self._neg = np.zeros(0, np.int64)  # counts of -x for x < 0
        self._zeros = 0  # zeros seen before the grid existed

    @property
    def bin_width(self) -> float:
        return 0.0 if self._exp is None else math.ldexp(1.0, self._exp)

    def _grow(self, m: float) -> None:
        k = _grid_exponent(m, self.num_bins)
        n = int(math.floor(math.ldexp(m, -k))) + 1  # m * 2**-k is exact
        if self._exp is None:
            self._exp = k
            self._pos = np.zeros(n, np.int64)
            self._neg = np.zeros(n, np.int64)
            self._pos[0] += self._zeros
            self._zeros = 0
            return
        shift = k - self._exp
        if shift == 0 and n == self._pos.size:
            return
        if shift > 0:
            idx = np.arange(self._pos.size, dtype=np.int64) >> min(shift, 62)
            pos = np.zeros(n, np.int64)
            neg = np.zeros(n, np.int64)
            np.add.at(pos, idx, self._pos)
            np.add.at(neg, idx, self._neg)
        else:
            pos = np.zeros(n, np.int64)
            neg = np.zeros(n, np.int64)
            pos[: self._pos.size] = self._pos
            neg[: self._neg.size] = self._neg
        self._exp, self._pos, self._neg = k, pos, neg

    def update(self, x: np.ndarray) -> None:
        a = self._scan(x)
        if a.size == 0:
            return
        m = max(-self.min, self.max)
        if m == 0.0:
            self._zeros += a.size
            return
        self._grow(m)
        _accumulate(a, math.ldexp(1.0, -self._exp), self._pos, self._neg)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of |x|: int64 counts of n bins and the n+1 float64 bin edges."""
        self._need_data()
        if self._exp is None:
            return np.array([self._zeros], np.int64), np.array([0.0, 0.0])
        counts = self._pos + self._neg
        return counts, np.arange(counts.size + 1, dtype=np.float64) * self.bin_width

    # a search over one one-sided histogram (bin units), returning amax; subclasses
    def _search(self, counts: np.ndarray, bits: int, unsigned: bool, vmax: float) -> float:
        raise NotImplementedError

    def _threshold(self, bits: int) -> float:
        if self._exp is None:
            return 0.0
        return self._search(self._pos + self._neg, bits, False, self.amax)

    def _range(self, bits: int) -> tuple[float, float]:
        if self._exp is None:
            return 0.0, 0.0
        w = self.bin_width
        if self.min >= 0.0:  # one-signed: all levels on the positive side
            return 0.0, self._search(self._pos, bits, True, self.max)
        if self.max <= 0.0:
            neg = self._neg[: int(math.floor(-self.min / w)) + 1].copy()
            neg[0] += self._pos[0]  # the zeros
            return -self._search(neg, bits, True, -self.min), 0.0
        pos = self._pos[: int(math.floor(self.max / w)) + 1]
        neg = self._neg[: int(math.floor(-self.min / w)) + 1]
        return -self._search(neg, bits, False, -self.min), self._search(pos, bits, False, self.max)


class PercentileObserver(HistogramObserver):
    """amax = lower edge of the histogram bin where the CDF of |x| reaches percentile/100."""

    name = "percentile"
    _options = ("percentile", "num_bins")

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        try:
            p = float(percentile)
        except (TypeError, ValueError):
            p = math.nan
        if not 0.0 < p <= 100.0:
            raise QConvertError(f"percentile must be a number in (0, 100], not {percentile!r}")
        self.percentile = p

    def _search(self, counts, bits, unsigned, vmax):
        if self.percentile >= 100.0:
            return vmax  # "keep everything" is the max, not the lower edge of its bin
        idx = _first_reaching(counts, self.percentile / 100.0)
        w = self.bin_width
        # The lower edge of the crossing bin (as TensorRT/onnxruntime); when the quantile lies in
        # bin 0 that edge is 0, which no quantizer can use, so take the bin's upper edge instead.
        return min(max(idx, 1) * w, vmax)

    def _range(self, bits):
        if self._exp is None or self.percentile >= 100.0:
            return self.min, self.max
        w = self.bin_width
        n = self._pos.size
        signed = np.concatenate([self._neg[::-1], self._pos])  # bin s covers [(s-n)w, (s-n+1)w)
        cut = (100.0 - self.percentile) / 200.0
        right = _first_reaching(signed, 1.0 - cut)
        left = _first_reaching(signed, cut)
        hi = min((right - n) * w, self.max)  # lower edge of the right crossing bin
        lo = max((left - n + 1) * w, self.min)  # upper edge of the left one (the mirror rule)
        return lo, hi


class _SearchObserver(HistogramObserver):
    _options = ("num_bins", "start_bin", "stride")

    def __init__(self, num_bins: int = 2048, start_bin: int = 128, stride: int = 1) -> None:
        super().__init__(num_bins)
        for key, val in (("start_bin", start_bin), ("stride", stride)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise QConvertError(f"{key} must be a positive integer, not {val!r}")
        self.start_bin = int(start_bin)
        self.stride = int(stride)


class EntropyObserver(_SearchObserver):
    """TensorRT's KL-divergence threshold search (see the module docstring)."""

    name = "entropy"

    def search_index(self, counts: np.ndarray, bits: int = 8, unsigned: bool = False) -> tuple[int, float]:
        """(i, KL) of the chosen candidate on a one-sided histogram; i = -1 if none."""
        bins = counts.astype(np.float64)
        if bins.size > 1:
            bins[0] = bins[1]
        nq = 1 << (bits - 1 + int(unsigned))
        return _entropy_index(bins, nq, max(self.start_bin, nq), self.stride)

    def _search(self, counts, bits, unsigned, vmax):
        i, _ = self.search_index(counts, bits, unsigned)
        if i < 0:  # the data spans fewer bins than the first candidate: nothing to clip
            return vmax
        return min(i * self.bin_width, vmax)


class MseObserver(_SearchObserver):
    """TensorRT's MSE search over bin centres (see the module docstring)."""

    name = "mse"

    def search_index(self, counts: np.ndarray, bits: int = 8, unsigned: bool = False) -> tuple[int, float]:
        """(i, error in bin-width units squared) of the chosen bin centre; i = -1 if none."""
        return _mse_index(counts.astype(np.float64), float(_max_bound(bits, unsigned)), self.start_bin, self.stride)

    def _search(self, counts, bits, unsigned, vmax):
        i, _ = self.search_index(counts, bits, unsigned)
        if i < 0:
            return vmax
        return min((i + 0.5) * self.bin_width, vmax)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}
_ALIASES = {"max": "minmax", "kl": "entropy"}


def make_observer(name: str, **options) -> Observer:
    """A fresh observer by name (``minmax``, ``percentile``, ``entropy``, ``mse``)."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    cls = OBSERVERS.get(key)
    if cls is None:
        raise QConvertError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}")
    bad = sorted(set(options) - set(cls._options))
    if bad:
        accepted = ", ".join(cls._options) or "none"
        raise QConvertError(f"the {key} observer has no option {', '.join(bad)} (accepted: {accepted})")
    return cls(**options)


# --------------------------------------------------------------------------- weight clipping


def clip_weights(
    W: np.ndarray,
    method: str = "mse",
    bits: int = 4,
    axis: int = 0,
    *,
    group: int | None = None,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
    quantize: Callable[[np.ndarray], np.ndarray] | None = None,
    **options,
) -> np.ndarray:
    """Per-row clip thresholds (float64, one per index along ``axis``) for a weight tensor.

    - ``minmax``: max |w| of each row (no clipping).
    - ``percentile`` / ``entropy``: the activation observers run on each row's values
      (``options`` are passed on, e.g. ``percentile=99.9``); the threshold for ``bits``.
    - ``mse``: a direct search on the row values, GPTQ's ``mse`` grid (ANCHORS C1): candidates
      ``amax * (1 - i/grid)`` for ``i < maxshrink*grid`` (default 80 of 100), each row clipped
      to ``[-c, c]`` and fake-quantized, error ``sum |Q(w) - w| ** norm`` (default 2.4 as GPTQ:
      between squared error and max error, it weighs the few large weights a bit more than
      MSE would; ``norm=2`` gives plain squared error). Ties keep the smaller shrink (i = 0, no
      clipping, on exact ties). The built-in quantizer is symmetric narrow-range RTN with
      ``2**(bits-1) - 1`` levels a side: scale = ``c / maxq`` per row, or, with ``group=g``,
      per ``g`` consecutive weights of the clipped row (``max|clip(w)| / maxq``) - pass the
      group size of the block codec that will follow so the search sees the real error.
      ``quantize`` replaces the built-in quantizer: a function from a (rows, cols) float64
      array of clipped weights (a chunk of the rows) to its fake-quantized (quantize-dequantize)
      copy, e.g. a GGML block codec's round trip.
      Cost: ``nsteps`` passes over the matrix (80 by default), fused in one numba kernel with
      rows in parallel for the built-in quantizer (~1 s for 1M weights with the 2.4 norm on one
      core; ``norm=2`` is several times faster); the ``quantize`` path runs numpy on chunks of
      about 4M weights.
    """
    bits = _check_bits(bits)
    key = _ALIASES.get(str(method).lower(), str(method).lower())
    if key not in OBSERVERS:
        raise QConvertError(f"unknown weight clip method {method!r}; choose one of: {', '.join(OBSERVERS)}")
    if key != "mse" and (group is not None or quantize is not None):
        raise QConvertError("group= and quantize= apply to the mse weight clip only")
    A = np.asarray(W)
    if A.ndim < 1 or A.size == 0:
        raise QConvertError("clip_weights needs a non-empty array")
    if not -A.ndim <= axis < A.ndim:
        raise QConvertError(f"axis {axis} is out of range for a {A.ndim}-D weight")
    rows = np.ascontiguousarray(np.moveaxis(A, axis, 0).reshape(A.shape[axis], -1), dtype=np.float64)
    if not np.isfinite(rows).all():
        raise QConvertError("clip_weights got NaN or infinite weights")
    amax = np.abs(rows).max(axis=1)
    if key == "minmax":
        if options:
            raise QConvertError(f"the minmax weight clip has no options ({', '.join(sorted(options))})")
        return amax
    if key in ("percentile", "entropy"):
        out = np.empty(rows.shape[0])
        for r in range(rows.shape[0]):
            obs = make_observer(key, **options)
            obs.update(rows[r])
            out[r] = obs.threshold(bits)
        return out
    if options:
        raise QConvertError(f"the mse weight clip has no option {', '.join(sorted(options))}")
    if group is not None and (
        isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1 or rows.shape[1] % group
    ):
        raise QConvertError(f"group {group} does not divide the row length {rows.shape[1]}")
    grid_ok = not isinstance(grid, bool) and isinstance(grid, (int, np.integer)) and grid >= 1
    if not (grid_ok and 0 < maxshrink < 1 and norm > 0):
        raise QConvertError("the mse weight clip needs grid >= 1, 0 < maxshrink < 1 and norm > 0")
    maxq = _max_bound(bits, False)
    nsteps = max(int(maxshrink * grid), 1)
    if quantize is None:
        return _clip_search_rows(rows, amax, float(maxq), float(norm), int(grid), nsteps, int(group or 0))
    clip = amax.copy()
    step = max(1, (1 << 22) // rows.shape[1])  # rows per chunk: bounded temporaries
    for r0 in range(0, rows.shape[0], step):
        W_ = rows[r0 : r0 + step]
        a = amax[r0 : r0 + step]
        best = np.full(W_.shape[0], np.inf)
        for i in range(nsteps):
            c = a * (1.0 - i / grid)
            Q = np.asarray(quantize(np.clip(W_, -c[:, None], c[:, None])), dtype=np.float64)
            if Q.shape != W_.shape:
                raise QConvertError(f"quantize= returned shape {Q.shape} for input {W_.shape}")
            err = (np.abs(Q - W_) ** norm).sum(axis=1)
            better = err < best
            best[better] = err[better]
            clip[r0 : r0 + step][better] = c[better]
    return clip
