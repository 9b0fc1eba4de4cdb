"""ONNX models as a source: the weights of MatMul / Gemm / Conv nodes, in the container orientation.

See ``qconvert/onnx/model.py`` for which tensors are weights and how each is laid out. Tensor
names are the ONNX tensor names (initializer or ``Constant`` output), shapes are the container
orientation ``(out, in)`` (Conv: ``(out, in/group·prod(kernel))``), unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source, SourceTensor


@dataclass
class OnnxSource(Source):
    model: Any = field(default=None, repr=False)  # the ModelProto, weights loaded
    stripped: Any = field(default=None, repr=False)  # the graph the container stores (placeholders)
    refs: dict = field(default_factory=dict, repr=False)  # name -> ConstRef (consumers index ``stripped``)


def _loader(ref) -> Any:
    def load_raw() -> np.ndarray:
        rows = ref.load_rows()
        if ref.float_type == "F16":
            rows = rows.astype(np.float16)
        rows = np.ascontiguousarray(rows)
        return rows.view(np.uint8).reshape(-1, rows.shape[-1] * rows.itemsize if rows.ndim else rows.itemsize)

    return load_raw


def open_onnx(path: str | Path) -> OnnxSource:
    from ..onnx.model import find_constants, load_model, model_config, sha256_file, strip_model

    path = Path(path)
    model, files = load_model(path)
    refs0 = find_constants(model)
    stripped = strip_model(model, refs0)
    refs = find_constants(stripped)  # same tensors; consumer indices of the stored graph
    for name, r in refs.items():
        r.origin, r.proto = refs0[name].origin, refs0[name].proto
    tensors = [SourceTensor(r.name, r.rows_shape, r.float_type, _loader(r)) for r in refs.values()]
    source_types: dict[str, int] = {}
    for t in tensors:
        source_types[t.dtype] = source_types.get(t.dtype, 0) + 1
    provenance = {
        "kind": "onnx",
        "id": path.name,
        "revision": None,
        "commit": None,
        "files": [{"name": n, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for n, p in files],
        "quantized": False,
        "source_types": source_types,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    return OnnxSource(
        kind="onnx",
        architecture="onnx",
        config=model_config(model),
        tensors=tensors,
        provenance=provenance,
        model=model,
        stripped=stripped,
        refs=refs,
    )
