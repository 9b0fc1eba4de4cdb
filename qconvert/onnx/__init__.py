"""ONNX models in and out: quantize an ONNX graph's weights, calibrate its activations, run
the stored graph, export a standard QDQ model.

A container made from an ONNX model (``model.architecture`` = ``onnx``) holds

- every weight of a ``MatMul`` / ``Gemm`` / ``Conv`` node (graph initializer or ``Constant``
  node) as a container tensor, in the container's ``(out, in)`` row orientation (FORMAT.md §9):
  ``MatMul`` weights ``(in, out)`` are stored transposed, ``Gemm`` weights as ``transB`` says,
  ``Conv`` weights ``(out, in, kh, kw)`` as rows of ``in·kh·kw``; quantized rows whose length is
  not a multiple of 32 are zero-padded to the next multiple (exact: zeros encode as zeros and
  change no block's scale);
- the graph itself without those weights (``onnx.graph``, a serialized ``ModelProto`` whose
  weight initializers are placeholders pointing at container tensors) and the map from weight
  to container tensor (``onnx.weights``), so the file is self-contained;
- after calibration (``--calib DIR``), the activation ranges of every input of a quantized node
  (``onnx.activations``): static W8A8, uint8 asymmetric per tensor, QDQ semantics.

Weight schemes: ``int8`` = per-output-channel symmetric int8 (one scale per row; stored in
Q8_0 blocks that all carry the row's scale, so the bytes are valid Q8_0 and the export is
exact per-channel int8 with zero point 0); ``Q8_0`` / ``Q4_0`` = GGML blocks of 32.
"""

from __future__ import annotations

from .model import is_onnx_container  # noqa: F401

__all__ = ["is_onnx_container", "quantize_onnx", "run_container", "export_qdq", "onnx_summary"]


def quantize_onnx(*args, **kwargs):
    from .convert import quantize_onnx as impl

    return impl(*args, **kwargs)


def run_container(*args, **kwargs):
    from .runner import run_container as impl

    return impl(*args, **kwargs)


def export_qdq(*args, **kwargs):
    from .export import export_qdq as impl

    return impl(*args, **kwargs)


def onnx_summary(*args, **kwargs):
    from .model import onnx_summary as impl

    return impl(*args, **kwargs)
