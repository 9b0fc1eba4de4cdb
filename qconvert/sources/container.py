"""A qconvert container read back as a source (to re-quantize it, or to calibrate on it).

Tensors keep their stored bytes (``dtype`` is the block type), so a matrix re-planned to the
same type is copied, and ``load()`` dequantizes the others; act-order matrices come back in
the original column order (``input_perm`` applied).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QConvertError
from .base import Source, SourceTensor


def source_from_container(c, close=None) -> Source:
    """A :class:`Source` over an open container ``c``."""
    if c.architecture in (None, "onnx"):
        raise QConvertError(f"{c.path} holds no language model to read as a source")
    tensors = []
    for name, info in c.tensors.items():
        perm = info.extra.get("input_perm") if isinstance(info.extra, dict) else None

        def load_raw(name=name):
            return c.raw(name)

        tensors.append(SourceTensor(name, tuple(info.shape), info.block_type.name, load_raw))
        if perm is not None:  # the stored columns are permuted: dequantized values come back unpermuted
            tensors[-1] = _Permuted(name, tuple(info.shape), info.block_type.name, load_raw,
                                    np.asarray(perm, dtype=np.int64))
    extra = {k: c.metadata[k] for k in ("tokenizer.gguf", "hf") if k in c.metadata}
    provenance = {"kind": "container", "id": Path(c.path).name, "files": [{"name": Path(c.path).name}],
                  "quantized": any(not t.block_type.is_float for t in c.tensors.values() if len(t.shape) == 2)}
    return Source(kind="container", architecture=c.architecture, config=c.config, tensors=tensors,
                  tokenizer_json=c.metadata.get("tokenizer.json"), provenance=provenance, extra_metadata=extra,
                  _close=close)


class _Permuted(SourceTensor):
    def __init__(self, name, shape, dtype, load_raw, perm) -> None:
        super().__init__(name, shape, dtype, load_raw)
        self.perm = perm
        self.params = {"input_perm": [int(i) for i in perm]}

    def load(self) -> np.ndarray:
        stored = super().load()
        out = np.empty_like(stored)
        out[:, self.perm] = stored
        return out


def open_container_source(path: str | Path) -> Source:
    from ..container import open_container

    c = open_container(path)
    return source_from_container(c, close=c.close)
