"""``qconvert run`` for ONNX containers: the stored graph with the dequantized weights.

Weight-only containers run the graph with every weight replaced by its dequantized values
(``q·d``, exactly what the container decodes to). Calibrated (static W8A8) containers also
fake-quantize the data input of every quantized node with its stored uint8 range, as
``QuantizeLinear`` → ``DequantizeLinear`` (QDQ semantics). onnxruntime runs it when
installed, else ``onnx.reference.ReferenceEvaluator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..container import Container, open_container
from .engine import Session, pick_engine
from .model import container_activations, container_weights, input_specs, materialize, stored_graph
from .qdq import activation_targets, add_activation_qdq, ensure_opset


def describe_mode(c: Container) -> str:
    weights = container_weights(c)
    schemes = sorted({e["scheme"] for e in weights.values() if e["role"] == "weight"})
    acts = container_activations(c)
    text = "weights " + "/".join(schemes or ["none"])
    if acts and acts.get("tensors"):
        text += f", activations uint8 static ({acts.get('observer')}, {len(acts['tensors'])} tensors, fake-quantized)"
    else:
        text += ", float activations (weight-only)"
    return text


def build_run_model(c: Container, fake_quant: bool = True, engine: str = "onnxruntime"):
    """The float model ``run`` executes (weights dequantized; activation Q/DQ when calibrated).

    The reference evaluator implements QuantizeLinear/DequantizeLinear from opset 19 only, so
    for it a calibrated graph is converted to opset 19."""
    model = stored_graph(c)
    targets = activation_targets(model, container_activations(c)) if fake_quant else {}
    if targets:
        model = ensure_opset(model, 10 if engine == "onnxruntime" else 19)
    model = materialize(c, model)
    add_activation_qdq(model, targets)
    return model


class Runner:
    """A container ready to run many times: ``Runner(c).run({name: array}) -> {output: array}``."""

    def __init__(self, c: Container, engine: str | None = None, fake_quant: bool = True, threads: int | None = None) -> None:
        engine = pick_engine(engine)
        model = build_run_model(c, fake_quant=fake_quant, engine=engine)
        self.inputs = input_specs(model)
        self.session = Session(model, engine, threads=threads)
        self.engine = self.session.engine
        self.engine_label = self.session.label
        self.mode = describe_mode(c)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds)

    def close(self) -> None:
        self.session.close()


def run_container(path_or_container: str | Path | Container, feeds: dict[str, np.ndarray], engine: str | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run once: (outputs, {"engine": ..., "mode": ...})."""
    own = not isinstance(path_or_container, Container)
    c = open_container(path_or_container) if own else path_or_container
    try:
        r = Runner(c, engine)
        try:
            outputs = r.run(feeds)
        finally:
            r.close()
        return outputs, {"engine": r.engine, "engine_version": r.engine_label, "mode": r.mode}
    finally:
        if own:
            c.close()
