"""Recipes: the calibrated methods as ordered steps over one calibration pass of a source.

``gptq``, ``awq``, ``awq+gptq`` (AWQ's scales folded in, then GPTQ on the scaled weights),
``w8a8`` (optionally SmoothQuant first) and the importance matrix all run
:func:`qconvert.calibrate.run_pipeline` on the open source -- HF folder, hub id, GGUF or
container alike -- with no temporary model on disk. Each returns what the converter stores:
encoded matrices, rewritten float tensors, and the recipe entries that say what ran.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import numpy as np

from .errors import QConvertError
from .sources.base import Source

# methods that are recipes of steps; "+" composes (every step but the last only transforms)
CALIBRATED_METHODS = ("gptq", "awq", "awq+gptq")


def tokenizer_for(source: Source):
    from .runtime.tokenizer import Tokenizer

    meta = {"model.config": source.config}
    if source.tokenizer_json is not None:
        meta["tokenizer.json"] = source.tokenizer_json
    meta.update(source.extra_metadata)
    return Tokenizer.from_container(SimpleNamespace(metadata=meta, path=source.provenance.get("id")))


def source_loader(source: Source, what: str) -> tuple[Callable[[str], np.ndarray], list[str]]:
    """``load(name)`` -> float32 values (refusing NaN/inf), and the tensor names."""
    by_name = {t.name: t for t in source.tensors}

    def load(name: str) -> np.ndarray:
        if name not in by_name:
            raise QConvertError(f"the source lacks {name}, which {what} needs")
        values = by_name[name].load()
        if not np.isfinite(values).all():
            raise QConvertError(f"tensor {name} has NaN or infinite values; refusing to quantize it")
        return values.astype(np.float32, copy=False)

    return load, list(by_name)


def _arch(source: Source, what: str):
    from .arch import by_name

    arch = by_name(source.architecture)
    if arch.kind != "decoder":
        raise QConvertError(f"{what} calibrates decoder language models, not {source.architecture}")
    return arch


def run_calibrated(source: Source, method: str, targets: set[str], bits: int, group: int, sym: bool, calib,
                   n_samples: int, seqlen: int, seed: int, damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False, mse: bool = False, progress=None):
    """GPTQ, AWQ or AWQ then GPTQ over ``targets``; returns (encoded, floats, recipe info)."""
    from .calibration import calibration_set
    from .calibrate import run_pipeline
    from .methods.calibrated import check_bits, encode_linear, group_for
    from .steps import Awq, AwqScale, Gptq, Results, search_windows

    if method not in CALIBRATED_METHODS:
        raise QConvertError(f"unknown calibrated method {method!r}; available: {', '.join(CALIBRATED_METHODS)}")
    check_bits(bits)
    arch = _arch(source, method)
    calib_set = calibration_set(tokenizer_for(source), calib, n_samples, seqlen, seed)
    load, names = source_loader(source, method)
    N, L = calib_set.tokens.shape
    results = Results()
    n_search = search_windows(N, L)
    steps: list = []
    if method.startswith("awq"):
        scale = AwqScale(targets, bits, group, group_for, n_search=n_search)
        steps.append(scale)
        if method == "awq":
            steps.append(Awq(scale, results))
    if method.endswith("gptq"):
        steps.append(Gptq(targets, results, bits, group, group_for, sym, damp, act_order, static_groups, mse))
    run_pipeline(arch, source.config, load, names, calib_set.tokens, steps, progress)
    encoded = {n: encode_linear(ql.q, ql.scales, ql.zeros, bits, ql.perm) for n, ql in results.linears.items()}
    groups_used = sorted({e.type_name for e in encoded.values()})
    info = {"calibration": calib_set.info, "steps": [s.name for s in steps],
            "groups_used": sorted({int(t.rsplit("G", 1)[1]) for t in groups_used})}
    if method.endswith("gptq"):
        info.update({"damp": damp, "act_order": act_order, "static_groups": static_groups, "mse": mse})
    if method.startswith("awq"):
        info["search_tokens"] = n_search * L
    return encoded, results.floats, info


def run_w8a8(source: Source, targets: set[str], calib, n_samples: int, seqlen: int, seed: int,
             observer: str = "minmax", smooth: float | None = None, act_mode: str = "static", progress=None):
    """W8A8 over ``targets`` (the matrices the plan lets the method take); returns
    (encoded W8A8 matrices, folded float tensors, recipe info)."""
    from .calibration import calibration_set
    from .calibrate import run_pipeline
    from .methods.w8a8 import check_options
    from .steps import W8A8, Results, Smooth

    observer = check_options(observer, smooth, act_mode)
    arch = _arch(source, "w8a8")
    load, names = source_loader(source, "w8a8")
    static = act_mode == "static"
    results = Results()
    steps: list = []
    if smooth is not None:
        # up -> down smoothing exists for static per-tensor ranges (the MLP output projection's outlier channels);
        # per-token scales do without it, and it only moves difficulty into the weights
        # (SmolLM2, 4 windows: dynamic+SQ PPL 22.86 without it, 22.91 with it)
        steps.append(Smooth(targets, smooth, with_linear_producers=static))
    steps.append(W8A8(targets, results, observer if static else None))
    calib_info = None
    if static or smooth is not None:
        calib_set = calibration_set(tokenizer_for(source), calib, n_samples, seqlen, seed)
        tokens, calib_info = calib_set.tokens, calib_set.info
    else:  # dynamic without smoothing needs no data: two tokens only walk the layers
        tok = tokenizer_for(source)
        tokens = np.array([[tok.bos_id if tok.bos_id is not None else 0] * 2])
    run_pipeline(arch, source.config, load, names, tokens, steps, progress)
    info = {"calibration": calib_info, "observer": observer if static else None, "smooth": smooth,
            "act_mode": act_mode, "steps": [s.name for s in steps]}
    return results.encoded, results.floats, info


def collect_importance(source: Source, tokens: np.ndarray, progress=None) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix (mean x^2 per input column of every layer's linears) over
    ``tokens`` (N, ctx) on the float model."""
    from .calibrate import run_pipeline
    from .steps import Imatrix

    arch = _arch(source, "an importance matrix")
    load, names = source_loader(source, "the importance matrix")
    step = Imatrix()
    run_pipeline(arch, source.config, load, names, tokens, [step], progress)
    return step.importance()
