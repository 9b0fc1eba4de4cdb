"""The qconvert container: a versioned, mmap-able, block-quantized model file (FORMAT.md)."""

from .reader import Container, TensorInfo, open_container
from .writer import ContainerWriter, TensorSpec

__all__ = ["Container", "ContainerWriter", "TensorInfo", "TensorSpec", "open_container"]
