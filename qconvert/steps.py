"""The steps a recipe is made of, each a hook on the calibration pipeline (``calibrate.py``).

A recipe is an ordered list of steps sharing one layer-by-layer pass (llm-compressor's
modifiers): transform steps change the float layer exactly (``AwqScale``, ``Smooth``), the last
step turns it into stored integers (``Gptq``, ``Awq``, ``W8A8``) -- or only collects
(``Imatrix``). The math is in ``methods/`` as pure functions over arrays; a step only decides
*when* to call it and on which weights, by the layer's input groups (``arch``'s
``input_groups``), never by tensor names.

Steps are told which matrices they may change (``targets``, full names): the plan leaves some
in float (``--keep``, ``--tensor-type``, the output projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .arch import InputGroup
from .calibrate import FloatLayer, LayerRun, Step
from .errors import QConvertError
from .methods import awq as awq_core

AWQ_SEARCH_TOKENS = 4096
CLIP_SKIPPED_ROLES = ("attn_q", "attn_k", "attn_qkv")  # AutoAWQ skips q/k: they feed a softmax


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
class Results:
    """What the quantizing steps hand back: integer matrices, rewritten float tensors."""

    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    encoded: dict = field(default_factory=dict)  # full name -> methods.calibrated.Encoded (W8A8)
    floats: dict[str, np.ndarray] = field(default_factory=dict)  # folded norms / linears kept in float
    stats: dict = field(default_factory=dict)


def search_windows(n_windows: int, seqlen: int, budget: int | None = None) -> int:
    """How many of the first calibration windows AWQ's forward-pass losses use: enough to hold
    ``budget`` (default ``AWQ_SEARCH_TOKENS``) tokens, at least one, at most all."""
    budget = AWQ_SEARCH_TOKENS if budget is None else budget
    return max(1, min(n_windows, -(-budget // seqlen)))


def _group_input(g: InputGroup, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The activation a group's linears read, as the block produced it: the input of ``fold[0]``
    when the group has one (a MoE router reads every token, each expert only its own), else
    that of its first linear; None when the forward never applied them (an idle expert)."""
    for n in g.fold[:1] + g.linears[:1]:
        if n in inputs:
            return inputs[n]
    return None


def _producer_fits(layer: FloatLayer, g: InputGroup, n_in: int) -> bool:
    """Does a linear producer's output feed the group's ``n_in`` inputs one to one (all its rows,
    or its last ``n_in`` with ``prev_tail``)? Not so for grouped-query v -> o."""
    rows = layer.get(g.prev).shape[0]
    return rows == n_in or (g.prev_tail and rows > n_in)


def _fold(layer: FloatLayer, g: InputGroup, s: np.ndarray) -> None:
    """Apply ``s`` between a group's producer and its linears (exact in real arithmetic)."""
    Ws = [layer.get(n) for n in g.linears]
    if g.prev_kind == "norm":
        w = layer.get(g.prev)
        # a (offset + w) norm: (offset + w) / s - offset
        folded_w, _, Ws = awq_core.fold_into_norm(w + np.float32(g.norm_offset), None, Ws, s)
        layer.set(g.prev, folded_w - np.float32(g.norm_offset))
    else:  # fold_into_linear scales the producer's last len(s) rows (all of them, or prev_tail's)
        b = layer.bias_name(g.prev)
        pw, pb, Ws = awq_core.fold_into_linear(layer.get(g.prev), layer.get(b) if b else None, Ws, s)
        layer.set(g.prev, pw)
        if b:
            layer.set(b, pb)
    for n, W in zip(g.linears, Ws):
        layer.set(n, W)
    for n in g.fold:  # readers of the same input that stay in float (a MoE router)
        layer.set(n, layer.get(n) * s[None, :])


def _changed_floats(layer: FloatLayer, quantized: set[str]) -> dict[str, np.ndarray]:
    """Every tensor of the layer a step rewrote and that is not stored as integers."""
    return {layer.full(n): layer.W[n] for n in sorted(layer.touched) if layer.full(n) not in quantized}


class _Groups:
    """Group sizes and targets shared by the group-wise steps."""

    def __init__(self, targets: set[str], bits: int, group: int, group_of: Callable[[int, int], int | None]) -> None:
        self.targets, self.bits, self.group, self.group_of = targets, bits, group, group_of

    def target(self, layer: FloatLayer, n: str) -> bool:
        return layer.full(n) in self.targets

    def g(self, in_features: int) -> int | None:
        return self.group_of(in_features, self.group)


class AwqScale(Step):
    """AWQ's activation-aware scale search, folded into the producers (norms / linears) of
    every input group; the float model computes the same function afterwards.

    Per group: ``s = x̄^α / w̄^(1-α)`` over a 20-point α grid, the loss being the group's module
    output (``module``: the attention or the MLP, run with ``Q(W·s)/s``) or the linears' own
    outputs, on the first ``AWQ_SEARCH_TOKENS`` tokens; ``x̄`` uses every token."""

    name = "awq_scale"

    def __init__(self, targets: set[str], bits: int, group: int, group_of, n_grid: int = 20, n_search: int = 1) -> None:
        self.q = _Groups(targets, bits, group, group_of)
        self.n_grid, self.n_search = n_grid, n_search
        self.inputs: dict[str, np.ndarray] = {}  # relative linear name -> its (scaled) input

    def begin_layer(self, run: LayerRun) -> None:
        layer, q = run.layer, self.q
        self.inputs = inputs = run.capture()
        for g in run.arch.input_groups(run.cfg, layer.index):
            if not all(q.target(layer, n) for n in g.linears):
                continue  # a linear the plan keeps in float
            X = _group_input(g, inputs)
            if X is None:
                continue  # never called (an idle expert's projection)
            if g.prev is not None and not layer.has(g.prev):
                continue
            gs = q.g(X.shape[-1])
            if gs is None:
                continue  # rows no group divides stay in float: no scale needed
            if g.prev_kind == "linear" and not _producer_fits(layer, g, X.shape[-1]):
                continue  # the producer's rows are not the inputs one to one (grouped-query v -> o)
            Ws = [layer.get(n) for n in g.linears]  # idle experts too: the fold changes their input
            loss = self._loss(run, g, X, Ws, gs)
            x_mean = awq_core.activation_stats(X.reshape(-1, X.shape[-1]))
            w_mean = awq_core.weight_stats(np.concatenate(Ws, axis=0), gs)
            s, _, _ = awq_core.search_scale(x_mean, w_mean, loss, n_grid=self.n_grid)
            _fold(layer, g, s)
            for n in g.linears + g.fold:  # what the folded layer's linears now read
                if n in inputs:
                    inputs[n] = inputs[n] / s

    def _loss(self, run: LayerRun, g: InputGroup, X: np.ndarray, Ws, gs: int):
        bits = self.q.bits
        if g.module is None:
            return awq_core.linear_group_loss(X, Ws, bits, gs)
        module = run.arch.modules[g.module]
        X_s = X[: self.n_search]
        ref = module(run.cfg, run.layer.trial({}), X_s, run.ctx)

        def loss(s: np.ndarray) -> float:
            trial = run.layer.trial({n: awq_core.scaled_pseudo_quantize(run.layer.get(n), s, bits, gs) for n in g.linears})
            out = module(run.cfg, trial, X_s, run.ctx)
            return float(np.mean((out - ref) ** 2))

        return loss


class Awq(Step):
    """AWQ's weight clipping and final group-wise asymmetric quantization (after ``AwqScale``),
    done after the block's float forward: the next block sees float outputs, as in AutoAWQ."""

    name = "awq"
    quantizes = True

    def __init__(self, scale: AwqScale, results: Results, clip: bool = True) -> None:
        self.scale, self.results, self.clip = scale, results, clip

    def end_layer(self, run: LayerRun) -> None:
        layer, q = run.layer, self.scale.q
        inputs = self.scale.inputs
        quantized = set()
        for n, X in inputs.items():
            if not q.target(layer, n):
                continue
            gs = q.g(layer.get(n).shape[1])
            if gs is None:
                continue
            W = layer.get(n)
            if self.clip and run.arch.role(layer.full(n)) not in CLIP_SKIPPED_ROLES:
                W = awq_core.apply_clip(W, awq_core.search_clip(W, X.reshape(-1, X.shape[-1]), q.bits, gs))
            _, codes, scales, zeros = awq_core.pseudo_quantize(W, q.bits, gs, zero_point=True)
            self.results.linears[layer.full(n)] = QuantizedLinear(codes, scales, zeros)
            quantized.add(layer.full(n))
        # linears the forward never applied (an expert no calibration token chose): no clipping
        for full in sorted(q.targets):
            if full.startswith(layer.prefix) and full not in quantized and layer.arch.layer_of(full) == layer.index:
                W = layer.get(full[len(layer.prefix):])
                gs = q.g(W.shape[1])
                if gs is None:
                    continue
                _, codes, scales, zeros = awq_core.pseudo_quantize(W, q.bits, gs, zero_point=True)
                self.results.linears[full] = QuantizedLinear(codes, scales, zeros)
                quantized.add(full)
        self.results.floats.update(_changed_floats(layer, quantized))


class Gptq(Step):
    """GPTQ: each linear group is quantized when the block first applies it, from the Hessian
    of its inputs -- computed with every earlier group of the block already quantized ("true
    sequential") -- and the block then runs on with the quantized weights."""

    name = "gptq"
    quantizes = True

    def __init__(self, targets: set[str], results: Results, bits: int, group: int, group_of, sym: bool,
                 damp: float, act_order: bool, static_groups: bool, mse: bool) -> None:
        self.q = _Groups(targets, bits, group, group_of)
        self.results = results
        self.opts = dict(sym=sym, damp=damp, act_order=act_order, static_groups=static_groups, mse=mse)
        self.losses: dict[str, float] = {}

    def on_input(self, layer: FloatLayer, names: tuple[str, ...], x: np.ndarray) -> None:
        from .methods.gptq import Hessian

        todo = [n for n in names if self.q.target(layer, n) and layer.full(n) not in self.results.linears]
        if not todo:
            return
        H = Hessian(x.shape[-1]).add_batch(x)
        for n in todo:
            self._quantize(layer, n, H.H)

    def _quantize(self, layer: FloatLayer, n: str, H: np.ndarray) -> None:
        from .methods.gptq import gptq_quantize

        W = layer.get(n)
        g = self.q.g(W.shape[1])
        if g is None:
            return  # no group size divides the rows: the matrix stays in float
        o = self.opts
        r = gptq_quantize(W, H, bits=self.q.bits, group=g, sym=o["sym"], damp=o["damp"], act_order=o["act_order"],
                          static_groups=o["static_groups"], mse=o["mse"])
        perm = r.perm if (o["act_order"] and not o["static_groups"]) else None
        codes = r.q
        if perm is not None:
            codes = codes[:, perm]  # stored in quantization order: groups are contiguous there
            assert np.array_equal(r.g_idx[perm], np.arange(len(perm)) // g)
        ql = QuantizedLinear(codes, r.scales, r.zeros, perm)
        self.results.linears[layer.full(n)] = ql
        self.losses[layer.full(n)] = float(r.loss)
        layer.set(n, ql.dequantize())  # later sub-layers (and the next block) see the quantized weights

    def end_layer(self, run: LayerRun) -> None:
        layer = run.layer
        # linears the forward never applied (an expert no calibration token chose): GPTQ with
        # an identity Hessian, which is round-to-nearest
        for full in sorted(self.q.targets):
            if full.startswith(layer.prefix) and full not in self.results.linears:
                n = full[len(layer.prefix):]
                if layer.arch.layer_of(full) == layer.index:
                    W = layer.get(n)
                    self._quantize(layer, n, np.eye(W.shape[1]))
        quantized = {n for n in self.results.linears if n.startswith(layer.prefix)}
        self.results.floats.update(_changed_floats(layer, quantized))
        self.results.stats["loss"] = self.losses


class Imatrix(Step):
    """llama.cpp's importance matrix: per linear, the mean of x_j^2 over every token it reads."""

    name = "imatrix"
    streaming = True

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def on_input(self, layer: FloatLayer, names: tuple[str, ...], x: np.ndarray) -> None:
        x2 = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        sq = np.einsum("ti,ti->i", x2, x2)
        for n in names:
            full = layer.full(n)
            self.sums[full] = self.sums[full] + sq if full in self.sums else sq.copy()
            self.counts[full] = self.counts.get(full, 0) + x2.shape[0]

    def importance(self) -> dict[str, np.ndarray]:
        return {n: (self.sums[n] / self.counts[n]).astype(np.float32) for n in sorted(self.sums)}


class Smooth(Step):
    """SmoothQuant: per input group, ``s_j = max|X_j|^α / max|W_j|^(1-α)`` folded into the
    producer; the float model computes the same function afterwards."""

    name = "smooth"

    def __init__(self, targets: set[str], alpha: float, with_linear_producers: bool) -> None:
        self.targets, self.alpha, self.with_linear = targets, alpha, with_linear_producers
        self.scales: dict[str, np.ndarray] = {}

    def begin_layer(self, run: LayerRun) -> None:
        from .methods.w8a8 import smooth_scales

        layer = run.layer
        inputs = run.capture()
        for g in run.arch.input_groups(run.cfg, layer.index):
            if g.prev_kind == "linear" and not self.with_linear:
                continue
            X = _group_input(g, inputs)
            if X is None or not all(layer.full(n) in self.targets for n in g.linears):
                continue
            if g.prev_kind == "linear" and (layer.full(g.prev) not in self.targets
                                            or not _producer_fits(layer, g, X.shape[-1])):
                continue
            amax = np.abs(X.reshape(-1, X.shape[-1])).max(axis=0)
            s = smooth_scales(amax, [layer.get(n) for n in g.linears], self.alpha)
            _fold(layer, g, s)
            for n in g.linears:
                self.scales[layer.full(n)] = s


class W8A8(Step):
    """int8 weights per output channel; static activation scales from an observer per distinct
    linear input (fed what the folded model computes), or none (dynamic, per token)."""

    name = "w8a8"
    quantizes = True

    def __init__(self, targets: set[str], results: Results, observer: str | None) -> None:
        self.targets, self.results, self.observer = targets, results, observer
        self.observers: dict[str, object] = {}  # full name of a call's first linear -> observer
        self.key: dict[str, str] = {}

    def on_input(self, layer: FloatLayer, names: tuple[str, ...], x: np.ndarray) -> None:
        if self.observer is None:
            return
        from .observers import make_observer

        key = layer.full(names[0])
        obs = self.observers.get(key)
        if obs is None:
            obs = self.observers[key] = make_observer(self.observer)
        obs.update(np.asarray(x, dtype=np.float32))
        for n in names:
            self.key[layer.full(n)] = key

    def end_layer(self, run: LayerRun) -> None:
        from .methods.w8a8 import act_scale_from_threshold, encode

        layer = run.layer
        quantized = set()
        for full in sorted(self.targets):
            if not full.startswith(layer.prefix) or layer.arch.layer_of(full) != layer.index:
                continue
            act = None  # dynamic per-token scales (also for an expert no calibration token chose)
            if self.observer is not None and full in self.key:
                act = act_scale_from_threshold(float(self.observers[self.key[full]].threshold(bits=8, symmetric=True)))
            self.results.encoded[full] = encode(layer.get(full[len(layer.prefix):]), act)
            quantized.add(full)
        self.results.floats.update(_changed_floats(layer, quantized))
