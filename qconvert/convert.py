"""The conversion pipeline: source -> per-tensor plan -> block codecs -> container.

Tensors stream through one at a time (read, check, quantize, write, forget), so memory stays
near the largest tensor, and the container is written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .blocks import by_name
from .container import ContainerWriter, TensorSpec
from .errors import QConvertError
from .methods.mixes import K_MIXES, MIXES, Mix
from .methods.rtn import rtn_mix
from .plan import TensorPlan, plan_tensors
from .sources import Source, open_source

# f32/f16/bf16 store every matrix in a float type: the unquantized reference that eval
# compares against (a quantized source such as a Q4_1 GGUF is dequantized into it).
FLOAT_METHODS = ("f32", "f16", "bf16")
METHODS = ("rtn", *FLOAT_METHODS, *K_MIXES)

# Called after each tensor: (index, total, plan).
Progress = Callable[[int, int, TensorPlan], None]


@dataclass
class ConvertResult:
    output: Path
    plans: list[TensorPlan]
    seconds: float
    source: dict[str, Any]


def build_recipe(method: str, mix: Mix, bits: int | None, group: int | None, sym: bool | None, keep: str | None,
                 tensor_types: list[str], imatrix: dict | None) -> dict:
    return {
        "method": method,
        "mix": mix.name,
        "bits": bits,
        "group": group,
        "sym": sym,
        "keep": keep,
        "tensor_types": list(tensor_types),
        "calibration": None,
        "imatrix": imatrix,
        "seed": None,
    }


def resolve_method(method: str, bits: int, group: int, sym: bool) -> tuple[Mix, int | None, int | None, bool | None]:
    """The mix a method means, and the bits/group/sym that describe it in the recipe."""
    if method == "rtn":
        return rtn_mix(bits, group, sym), bits, group, sym
    if method in FLOAT_METHODS or method in K_MIXES:
        return MIXES[method], None, None, None
    raise QConvertError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def container_metadata(source: Source, recipe: dict, plans: list[TensorPlan]) -> dict[str, Any]:
    source_bytes = 0
    for p in plans:
        source_bytes += by_name(p.source_type).nbytes(p.shape)
    provenance = dict(source.provenance)
    provenance["tensor_bytes"] = source_bytes
    meta: dict[str, Any] = {
        "qconvert.version": __version__,
        "model.architecture": source.architecture,
        "model.config": source.config,
        "recipe": recipe,
        "source": provenance,
    }
    if source.tokenizer_json is not None:
        meta["tokenizer.json"] = source.tokenizer_json
    for key in sorted(source.extra_metadata):
        meta[key] = source.extra_metadata[key]
    return meta


def _encode(plan: TensorPlan, tensor, importance: np.ndarray | None = None) -> np.ndarray:
    if plan.copies_source:
        return tensor.load_raw()
    values = tensor.load()
    if not np.isfinite(values).all():
        bad = int(np.size(values) - np.isfinite(values).sum())
        raise QConvertError(f"tensor {plan.name} has {bad} NaN or infinite values; refusing to quantize it")
    return by_name(plan.type_name).quantize(values.reshape(-1, plan.shape[-1]), importance)


def quantize(
    source: str | Path,
    output: str | Path,
    method: str = "rtn",
    bits: int = 8,
    group: int = 32,
    sym: bool = True,
    keep: str | None = None,
    tensor_types: list[str] | tuple[str, ...] = (),
    revision: str | None = None,
    imatrix: str | Path | None = None,
    calib: str | Path | None = None,
    calib_chunks: int | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Quantize a checkpoint (HF folder or hub id, or .gguf) into a qconvert container.

    >>> qconvert.quantize("../shared/models/stories260K", "s.q8", method="rtn", bits=8)  # doctest: +SKIP
    """
    mix, r_bits, r_group, r_sym = resolve_method(method, bits, group, sym)
    importance: dict[str, np.ndarray] = {}
    imatrix_info = None
    if imatrix is not None and calib is not None:
        raise QConvertError("give either --imatrix FILE or --calib TEXT (which computes one), not both")
    if imatrix is not None:
        from .imatrix import load_imatrix

        importance, imatrix_info = load_imatrix(imatrix)
    elif calib is not None:
        from .imatrix import imatrix_for_source

        importance, imatrix_info = imatrix_for_source(source, calib, chunks=calib_chunks, revision=revision)
    recipe = build_recipe(method, mix, r_bits, r_group, r_sym, keep, list(tensor_types), imatrix_info)
    started = time.perf_counter()
    output = Path(output)
    with open_source(str(source), revision=revision) as src:
        if importance and not any(t.name in importance for t in src.tensors):
            raise QConvertError("the importance matrix names none of this model's tensors: it was made for another model")
        plans = plan_tensors(
            src.tensors, src.config, mix, keep=keep, tensor_types=list(tensor_types), has_imatrix=bool(importance)
        )
        metadata = container_metadata(src, recipe, plans)
        specs = [TensorSpec(p.name, p.shape, p.type_name) for p in plans]
        by_tensor = {t.name: t for t in src.tensors}
        with ContainerWriter(output, metadata, specs) as writer:
            for i, plan in enumerate(plans):
                writer.write(plan.name, _encode(plan, by_tensor[plan.name], importance.get(plan.name)))
                if progress is not None:
                    progress(i + 1, len(plans), plan)
        provenance = metadata["source"]
    return ConvertResult(output, plans, time.perf_counter() - started, provenance)
