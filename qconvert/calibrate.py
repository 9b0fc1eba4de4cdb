"""One calibration pipeline for every method: the architecture's blocks, layer by layer.

    x = embed(calibration windows)                       (N, L, H), float32
    for each layer i:
        every step's begin_layer(run)                     (AWQ / SmoothQuant: search and fold scales)
        x = arch.block(cfg, layer_i, x, ctx)              (each linear group's input -> every step's
                                                           on_input: Hessians, |x|, x^2, observers;
                                                           GPTQ quantizes the group right there)
        every step's end_layer(run)                       (AWQ / W8A8: quantize the folded layer)

Only one layer's float weights are in memory at a time (read from the source when the block
asks for them), plus the calibration activations. Block ``i+1`` sees block ``i``'s outputs as
computed with whatever its steps left in it: the quantized weights when a step quantizes
during the forward (GPTQ, "true sequential" inside the block too), the float weights when
the steps quantize after it (AWQ as AutoAWQ does, the importance matrix, W8A8's observers).
The block forward is the architecture's own (``arch/<family>.py``) -- the code the runtime runs.

Steps are small objects (``qconvert/steps.py``) that declare what they collect; several run in
one pass, in order, e.g. AWQ's scale search then GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .arch import Arch, Context
from .errors import QConvertError


class FloatLayer:
    """One layer's float32 weights as the block sees them, loaded on first use; every linear
    group's input goes to the steps' ``on_input`` before the group is applied."""

    def __init__(self, arch: Arch, load: Callable[[str], np.ndarray], names: set[str], index: int,
                 steps: Sequence["Step"] = ()) -> None:
        self.arch, self.load, self.names, self.index = arch, load, names, index
        self.prefix = arch.layer_name(index, "")
        self.W: dict[str, np.ndarray] = {}  # relative name -> current float values
        self.touched: set[str] = set()  # relative names a step rewrote (folded scales, quantized weights)
        self.steps = list(steps)

    def full(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return name in self.W or self.prefix + name in self.names

    def get(self, name: str) -> np.ndarray:
        w = self.W.get(name)
        if w is None:
            w = self.W[name] = self.load(self.prefix + name)
        return w

    def set(self, name: str, value: np.ndarray) -> None:
        # kept in the dtype it comes in: GPTQ's dequantized weights are float64 (integer codes
        # times fp16-exact scales), and the activations after them follow (as measured)
        self.W[name] = np.asarray(value)
        self.touched.add(name)

    def vector(self, name: str) -> np.ndarray:
        return self.get(name).reshape(-1)

    def bias_name(self, name: str) -> str | None:
        b = name[: -len("weight")] + "bias" if name.endswith(".weight") else None
        return b if b is not None and self.has(b) else None

    def linears(self, names: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
        for step in self.steps:
            step.on_input(self, names, x)
        out = []
        for n in names:
            # x (N, L, in) @ W^T as it comes: numpy runs one BLAS product per window, and the
            # GPTQ/AWQ figures of BENCHMARKS.md were measured with exactly these roundings
            y = x @ self.get(n).T
            b = self.bias_name(n)
            if b is not None:
                y += self.vector(b)
            out.append(y)
        return out

    def trial(self, replaced: dict[str, np.ndarray]) -> "FloatLayer":
        """A view with some weights replaced and no steps (a search's candidate)."""
        t = FloatLayer(self.arch, self.load, self.names, self.index)
        t.W = {**self.W, **replaced}
        return t


@dataclass
class LayerRun:
    """What a step sees of the layer being calibrated."""

    arch: Arch
    cfg: object
    layer: FloatLayer
    x: np.ndarray  # the block's input (N, L, H)
    ctx: Context

    def capture(self, x: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Run the block in float on ``x`` (default: all windows) and return the input of
        every linear call, keyed by each linear's relative name."""
        seen: dict[str, np.ndarray] = {}
        rec = _Recorder(seen)
        saved, self.layer.steps = self.layer.steps, [rec]
        try:
            self.arch.block(self.cfg, self.layer, self.x if x is None else x, self.ctx)
        finally:
            self.layer.steps = saved
        return seen


class _Recorder:
    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def on_input(self, layer, names, x) -> None:
        for n in names:
            if n in self.seen:  # a MoE expert called once per chunk of tokens: not expected
                raise QConvertError(f"linear {n} is called twice in one block")
            self.seen[n] = x


class Step:
    """Base class: a step collects statistics or changes the layer (all hooks optional)."""

    name = "step"
    quantizes = False  # does it produce the stored integers (the last step of a recipe)?
    streaming = False  # only sums statistics over windows: the block may run a few windows at a time

    def begin_layer(self, run: LayerRun) -> None:
        pass

    def on_input(self, layer: FloatLayer, names: tuple[str, ...], x: np.ndarray) -> None:
        pass

    def end_layer(self, run: LayerRun) -> None:
        pass


def embed_tokens(arch: Arch, cfg, load: Callable[[str], np.ndarray], names: Sequence[str], tokens: np.ndarray) -> np.ndarray:
    emb_name = next((n for n in names if arch.role(n) == "token_embd"), None)
    if emb_name is None:
        raise QConvertError("the model has no token embedding")
    x = load(emb_name)[tokens].astype(np.float32)  # (N, L, H)
    scale = getattr(cfg, "embed_scale", None)
    return x * np.float32(scale) if scale is not None else x


STREAM_WINDOWS = 8  # windows per block call when every step streams (bounds the block's temporaries)


def run_pipeline(arch: Arch, config: dict, load: Callable[[str], np.ndarray], names: Sequence[str],
                 tokens: np.ndarray, steps: Sequence[Step], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Feed ``tokens`` (N, L) through every block of the model, calling ``steps``' hooks;
    returns the last block's output (N, L, H)."""
    if arch.kind != "decoder" or arch.block is None:
        raise QConvertError(f"calibration runs decoder language models; {arch.name} is not one")
    cfg = arch.parse_config(config)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.size == 0:
        raise QConvertError("calibration needs at least one window of tokens")
    if tokens.max() >= cfg.vocab_size or tokens.min() < 0:
        raise QConvertError("the calibration tokens fall outside the model's vocabulary")
    name_set = set(names)
    # the heavy products are mid-sized GEMMs interleaved with small ones; OpenBLAS workers that
    # spin between calls starve each other on a loaded machine (one thread: steadier, measured)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        x = embed_tokens(arch, cfg, load, names, tokens)
        ctx = Context(tokens.shape[1])
        for i in range(cfg.n_layers):
            layer = FloatLayer(arch, load, name_set, i, steps)
            run = LayerRun(arch, cfg, layer, x, ctx)
            for s in steps:
                s.begin_layer(run)
            if all(s.streaming for s in steps) and len(x) > STREAM_WINDOWS:
                x = np.concatenate([arch.block(cfg, layer, x[b:b + STREAM_WINDOWS], ctx)
                                    for b in range(0, len(x), STREAM_WINDOWS)])
            else:
                x = arch.block(cfg, layer, x, ctx)
            for s in steps:
                s.end_layer(run)
            if not np.isfinite(x).all():
                raise QConvertError(f"the calibration activations overflowed after layer {i}")
            if progress is not None:
                progress(i + 1, cfg.n_layers)
    return x
