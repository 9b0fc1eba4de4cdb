"""Input readers. :func:`open_source` picks one from what the path is."""

from __future__ import annotations

from pathlib import Path

from ..errors import QConvertError
from .base import Source, SourceTensor

__all__ = ["Source", "SourceTensor", "open_source"]


def open_source(spec: str, revision: str | None = None) -> Source:
    """A ``.gguf`` or ``.onnx`` file, a local Hugging Face folder, or a hub id (``owner/name``)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise QConvertError(f"no such file: {spec}")
        from .gguf import open_gguf

        return open_gguf(path)
    if path.suffix.lower() == ".onnx":
        from .onnx import open_onnx

        return open_onnx(path)
    if path.is_file() and path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        from .llama2c import refusal

        if path.suffix.lower() == ".bin" and (sentence := refusal(path)) is not None:
            raise QConvertError(sentence)
        raise QConvertError(
            f"{path.name} is a pickle checkpoint; qconvert never unpickles (it can run arbitrary code):"
            " convert it to safetensors first"
        )
    from .hf import open_hf

    return open_hf(spec, revision=revision)
