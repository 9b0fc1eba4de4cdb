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
from .methods.rtn import rtn_block_type
from .plan import TensorPlan, plan_tensors
from .sources import Source, open_source

# Storing every matrix in a float type: the unquantized reference that eval compares against
# (a quantized source such as a Q4_1 GGUF is dequantized into it).
FLOAT_METHODS = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
METHODS = ("rtn", *FLOAT_METHODS)

# Called after each tensor: (index, total, plan).
Progress = Callable[[int, int, TensorPlan], None]


@dataclass
class ConvertResult:
    output: Path
    plans: list[TensorPlan]
    seconds: float
    source: dict[str, Any]


def build_recipe(method: str, bits: int, group: int, sym: bool, keep: str | None, tensor_types: list[str]) -> dict:
    return {
        "method": method,
        "bits": bits,
        "group": group,
        "sym": sym,
        "keep": keep,
        "tensor_types": list(tensor_types),
        "calibration": None,
        "seed": None,
    }


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


def _encode(plan: TensorPlan, tensor) -> np.ndarray:
    if plan.copies_source:
        return tensor.load_raw()
    values = tensor.load()
    if not np.isfinite(values).all():
        bad = int(np.size(values) - np.isfinite(values).sum())
        raise QConvertError(f"tensor {plan.name} has {bad} NaN or infinite values; refusing to quantize it")
    return by_name(plan.type_name).quantize(values.reshape(-1, plan.shape[-1]))


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
    progress: Progress | None = None,
) -> ConvertResult:
    """Quantize a checkpoint (HF folder or hub id, or .gguf) into a qconvert container.

    >>> qconvert.quantize("../shared/models/stories260K", "s.q8", method="rtn", bits=8)  # doctest: +SKIP
    """
    if method not in METHODS:
        raise QConvertError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if method in FLOAT_METHODS:
        default = by_name(FLOAT_METHODS[method])
        output_type = default.name
        bits = int(default.bits_per_weight)
    else:
        default = rtn_block_type(bits, group, sym)
        output_type = None
    recipe = build_recipe(method, bits, group, sym, keep, list(tensor_types))
    started = time.perf_counter()
    output = Path(output)
    with open_source(str(source), revision=revision) as src:
        plans = plan_tensors(
            src.tensors, src.config, default, keep=keep, tensor_types=list(tensor_types), output_type=output_type
        )
        metadata = container_metadata(src, recipe, plans)
        specs = [TensorSpec(p.name, p.shape, p.type_name) for p in plans]
        by_tensor = {t.name: t for t in src.tensors}
        with ContainerWriter(output, metadata, specs) as writer:
            for i, plan in enumerate(plans):
                writer.write(plan.name, _encode(plan, by_tensor[plan.name]))
                if progress is not None:
                    progress(i + 1, len(plans), plan)
        provenance = metadata["source"]
    return ConvertResult(output, plans, time.perf_counter() - started, provenance)
