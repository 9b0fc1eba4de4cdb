"""Running an ONNX model: onnxruntime when installed, else ``onnx.reference.ReferenceEvaluator``.

onnxruntime runs with its QDQ graph transformers off (``session.disable_quant_qdq``): they turn
``DequantizeLinear`` → op → ``QuantizeLinear`` groups into integer kernels and quantize float
weights that sit between Q/DQ pairs, which computes other numbers than the graph says. With them
off, onnxruntime and the reference evaluator agree to float rounding.

``QCONVERT_ONNX_ENGINE=reference`` (or ``engine="reference"``) forces the reference evaluator,
``onnxruntime`` requires onnxruntime.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QConvertError

_PROTO_LIMIT = 1_900_000_000  # protobuf's 2 GiB limit, with a margin


def have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def pick_engine(engine: str | None = None) -> str:
    choice = (engine or os.environ.get("QCONVERT_ONNX_ENGINE") or "auto").lower()
    if choice not in ("auto", "onnxruntime", "reference"):
        raise QConvertError(f"unknown ONNX engine {choice!r}; choose onnxruntime or reference")
    if choice == "reference":
        return "reference"
    if have_onnxruntime():
        return "onnxruntime"
    if choice == "onnxruntime":
        raise QConvertError("onnxruntime is not installed (pip install onnxruntime); the reference evaluator can run without it")
    return "reference"


class Session:
    """One model, ready to run: ``Session(model).run(feeds, outputs=None) -> {name: array}``."""

    def __init__(self, model, engine: str | None = None, threads: int | None = None, qdq_fusion: bool = False) -> None:
        self.engine = pick_engine(engine)
        self._tmp = None
        if self.engine == "onnxruntime":
            import onnxruntime as ort

            self.version = ort.__version__
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if not qdq_fusion:
                # onnxruntime's QDQ transformers replace Q/DQ groups by integer kernels and even
                # quantize float weights next to them (WeightBiasQuantization): other numbers than
                # the QDQ semantics. qconvert runs the graph as written.
                so.add_session_config_entry("session.disable_quant_qdq", "1")
            if threads:
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
            try:
                self._sess = ort.InferenceSession(self._source(model), so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise QConvertError(f"onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}") from None
            self.output_names = [o.name for o in self._sess.get_outputs()]
        else:
            import onnx
            from onnx.reference import ReferenceEvaluator

            self.version = onnx.__version__
            try:
                self._sess = ReferenceEvaluator(model)
            except Exception as e:
                raise QConvertError(f"the ONNX reference evaluator cannot load the model: {str(e).splitlines()[0][:300]}") from None
            self.output_names = [o.name for o in model.graph.output]

    @property
    def label(self) -> str:
        return f"onnxruntime {self.version}" if self.engine == "onnxruntime" else f"onnx.reference {self.version}"

    def _source(self, model) -> Any:
        if model.ByteSize() < _PROTO_LIMIT:
            return model.SerializeToString()
        import onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="qconvert-onnx-")
        path = Path(self._tmp.name) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="model.data")
        return str(path)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        try:
            vals = self._sess.run(names, feeds)
        except Exception as e:
            raise QConvertError(f"{self.label} failed to run the model: {str(e).splitlines()[0][:300]}") from None
        return {n: np.asarray(v) for n, v in zip(names, vals)}

    def close(self) -> None:
        self._sess = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
