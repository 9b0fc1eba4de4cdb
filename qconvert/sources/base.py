"""What every input reader (Hugging Face, GGUF, ONNX) hands to the converter.

A source is opened once, describes the model (architecture, HF-style config, tokenizer,
provenance) and lists its tensors without reading them. Each tensor's bytes are read only when
``load()`` / ``load_raw()`` is called, so conversion memory stays near the largest tensor.

Conventions every source follows:
- tensor names are the Hugging Face names (each family's table in ``qconvert/arch/``), so
  overrides such as ``--keep 'lm_head|embed'`` mean the same for every input;
- shapes are in numpy order (outermost first, last axis contiguous);
- q/k projection rows use HF's rotate-half RoPE layout (a GGUF source undoes llama.cpp's
  pair permutation; it is a row permutation, so raw blocks move unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # block type name of the stored bytes: "F32", "F16", "BF16", "Q4_1", ...
    _load_raw: Callable[[], np.ndarray] = field(repr=False)

    def load_raw(self) -> np.ndarray:
        """The stored bytes, as a uint8 array laid out for block type ``dtype``."""
        return self._load_raw()

    def load(self) -> np.ndarray:
        """The values as float32, in ``shape``."""
        from ..blocks import by_name

        return by_name(self.dtype).dequantize(self.load_raw(), self.shape)


@dataclass
class Source:
    kind: str  # "hf" | "gguf" | "onnx"
    architecture: str  # "llama", "gpt2", "bert", ...
    config: dict[str, Any]  # HF-style config.json
    tensors: list[SourceTensor]
    tokenizer_json: str | None = None  # HF tokenizer.json text, when the source has one
    provenance: dict[str, Any] = field(default_factory=dict)  # id, revision, files, quantized ...
    extra_metadata: dict[str, Any] = field(default_factory=dict)  # kept verbatim in the container
    _close: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
