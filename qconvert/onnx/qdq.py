"""Graph edits shared by ``run`` and ``export``: opset upgrades and activation Q/DQ pairs.

Static activation quantization has QDQ semantics: a calibrated tensor ``t`` becomes
``DequantizeLinear(QuantizeLinear(t, scale, zero_point), scale, zero_point)`` (uint8, per
tensor) for the quantized nodes that read it (their data input); other readers keep ``t``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import QConvertError
from .model import onnx_module, set_repeated


def default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def ensure_opset(model, minimum: int):
    """``model`` with a default-domain opset of at least ``minimum`` (ops converted by onnx's
    version converter), and an IR version that allows it."""
    onnx = onnx_module()
    have = default_opset(model)
    if have >= minimum:
        return model
    from onnx import version_converter

    try:
        model = version_converter.convert_version(model, minimum)
    except Exception as e:
        raise QConvertError(
            f"the graph is opset {have} and needs opset {minimum} for this; onnx's version converter failed: {str(e).splitlines()[0][:200]}"
        ) from None
    try:
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:
        need = model.ir_version
    model.ir_version = max(int(model.ir_version), int(need))
    return model


def add_opset(model, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(onnx_module().helper.make_opsetid(domain, version))


class Names:
    """Fresh value / node names that collide with nothing in the graph."""

    def __init__(self, model) -> None:
        g = model.graph
        self.used = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            self.used.update(n.input)
            self.used.update(n.output)
            if n.name:
                self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def activation_targets(model, activations: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Calibrated tensors with their consumers named by output (``nodes`` are indices in the
    stored graph; call this on the graph as stored, before any edit that adds or moves nodes)."""
    if not activations or not activations.get("tensors"):
        return {}
    g = model.graph
    out = {}
    tensors = activations.get("tensors") if isinstance(activations, dict) else None
    if not isinstance(tensors, dict):
        raise QConvertError("corrupt container: onnx.activations has no tensors object")
    for t, a in tensors.items():
        ok = (isinstance(a, dict) and isinstance(a.get("nodes"), list) and all(type(i) is int for i in a["nodes"])
              and isinstance(a.get("scale"), (int, float)) and not isinstance(a.get("scale"), bool) and a["scale"] > 0
              and type(a.get("zero_point")) is int and 0 <= a["zero_point"] <= 255)
        if not ok:
            raise QConvertError(f"corrupt container: onnx.activations entry {t!r} needs nodes, a positive scale and a zero_point 0-255")
        keys = []
        for idx in a["nodes"]:
            if not 0 <= idx < len(g.node) or not g.node[idx].output or t not in g.node[idx].input[:1]:
                raise QConvertError(f"corrupt container: activation {t!r} is not the data input of node {idx}")
            keys.append(g.node[idx].output[0])
        out[t] = {"scale": a["scale"], "zero_point": a["zero_point"], "consumers": keys}
    return out


def add_activation_qdq(model, targets: dict[str, dict[str, Any]], names: Names | None = None) -> int:
    """Insert a QuantizeLinear/DequantizeLinear pair per calibrated tensor (from
    :func:`activation_targets`) and point its quantized consumers at the pair; returns the count."""
    if not targets:
        return 0
    onnx = onnx_module()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    if default_opset(model) < 10:
        raise QConvertError("activation quantization needs opset >= 10 (QuantizeLinear); upgrade the graph")
    g = model.graph
    names = names or Names(model)
    by_output = {n.output[0]: n for n in g.node if n.output}
    pairs: dict[str, list] = {}
    for t, a in targets.items():
        scale = names(f"{t}_scale")
        zp = names(f"{t}_zero_point")
        q_out = names(f"{t}_quantized")
        dq_out = names(f"{t}_dequantized")
        g.initializer.append(numpy_helper.from_array(np.array(a["scale"], dtype=np.float32), scale))
        g.initializer.append(numpy_helper.from_array(np.array(a["zero_point"], dtype=np.uint8), zp))
        pairs[t] = [
            helper.make_node("QuantizeLinear", [t, scale, zp], [q_out], name=names(f"{t}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out], name=names(f"{t}_DequantizeLinear")),
        ]
        for key in a["consumers"]:
            node = by_output.get(key)
            if node is None or not node.input or node.input[0] != t:
                raise QConvertError(f"the graph changed: the node making {key!r} no longer reads {t!r}")
            node.input[0] = dq_out
    produced = {o for n in g.node for o in n.output}
    nodes = []
    for t in pairs:
        if t not in produced:  # a graph input
            nodes += pairs[t]
    for n in g.node:
        nodes.append(n)
        for o in n.output:
            if o in pairs:
                nodes += pairs[o]
    set_repeated(g.node, nodes)
    return len(pairs)
