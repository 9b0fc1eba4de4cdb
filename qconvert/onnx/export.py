"""``qconvert export model.q --to onnx``: a standard QDQ model that onnxruntime runs.

Each stored weight becomes, exactly (the exported graph computes what ``qconvert run`` does):

- ``int8`` (and any Q8_0 tensor whose blocks share one scale per row): an int8 initializer in the
  weight's ONNX orientation, per-channel ``DequantizeLinear`` (axis = the output channel,
  float scales, int8 zero points 0) whose output has the weight's name (opset >= 13);
- other ``Q8_0`` / ``Q4_0`` tensors: block-wise ``DequantizeLinear`` (opset 21, ``block_size``
  32, int8 / int4 values, zero points 0) along the input dimension; Conv weights are
  dequantized as ``(out, in·k)`` and reshaped;
- ``Q4_0`` weight of a single ``MatMul`` (float32): onnxruntime's ``com.microsoft.MatMulNBits``
  (4 bits, blocks of 32, default zero point 8 = Q4_0's offset) unless ``contrib_ops=False``;
- float tensors: float initializers.

Calibrated activations get the same ``QuantizeLinear`` → ``DequantizeLinear`` pairs (uint8,
per tensor) as ``run`` uses. The graph's opset is raised (onnx's version converter) only when
the weights need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..atomicfile import AtomicFile
from ..container import Container, open_container
from .model import container_activations, container_weights, dequantized_value, onnx_module, stored_graph
from .qdq import Names, activation_targets, add_activation_qdq, add_opset, ensure_opset
from .quant import QK, common_row_scale, q4_0_parts, q8_0_parts

_PROTO_LIMIT = 1_900_000_000


def _int4_tensor(name: str, values: np.ndarray):
    """An INT4 TensorProto (ONNX packing: element 2i in the low nibble of byte i)."""
    onnx = onnx_module()
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx.TensorProto.INT4
    t.dims.extend(values.shape)
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return t


def _weight_parts(c: Container, entry: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """(kind, q (rows, k) ints cropped to the real row length, d (rows, blocks) float32)."""
    info = c.info(entry["tensor"])
    raw = c.raw(entry["tensor"])
    rows = info.shape[0]
    k = entry["row_length"]
    if entry["type"] == "Q8_0":
        q, d = q8_0_parts(raw, rows)
        return "int8", q[:, :k], d
    if entry["type"] == "Q4_0":
        q, d = q4_0_parts(raw, rows)
        return "int4", q[:, :k], d
    raise AssertionError(entry["type"])


def _plan(c: Container, model) -> dict[str, str]:
    """name -> "float" | "per_channel" | "blocked" | "nbits"."""
    g = model.graph
    out = {}
    for name, e in container_weights(c).items():
        if e["type"] not in ("Q8_0", "Q4_0"):
            out[name] = "float"
            continue
        if e["type"] == "Q8_0":
            _, _, d = _weight_parts(c, e)
            out[name] = "per_channel" if common_row_scale(d) is not None else "blocked"
            continue
        out[name] = "blocked"
        cons = e["consumers"]
        if len(cons) == 1 and cons[0]["op"] == "MatMul" and e["layout"] == "in_out" and e["dtype"] == "float32":
            users = sum(1 for n in g.node for i in n.input if i == name) + sum(1 for o in g.output if o.name == name)
            if users == 1:
                out[name] = "nbits"
    return out


def export_qdq(path_or_container: str | Path | Container, output: str | Path, contrib_ops: bool = True) -> dict[str, Any]:
    own = not isinstance(path_or_container, Container)
    c = open_container(path_or_container) if own else path_or_container
    try:
        return _export(c, Path(output), contrib_ops)
    finally:
        if own:
            c.close()


def _export(c: Container, output: Path, contrib_ops: bool) -> dict[str, Any]:
    onnx = onnx_module()
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    model = stored_graph(c)
    weights = container_weights(c)
    acts = container_activations(c)
    plan = _plan(c, model)
    targets = activation_targets(model, acts)
    nbits_nodes = {name: model.graph.node[weights[name]["consumers"][0]["node"]].output[0]
                   for name, kind in plan.items() if kind == "nbits"}
    if not contrib_ops:
        plan = {k: ("blocked" if v == "nbits" else v) for k, v in plan.items()}
    kinds = set(plan.values())
    need = 21 if "blocked" in kinds else 13 if "per_channel" in kinds else 10 if targets else 1
    model = ensure_opset(model, need)
    g = model.graph
    names = Names(model)

    # MatMulNBits replaces its MatMul in place.
    by_output = {n.output[0]: n for n in g.node if n.output}
    replaced: dict[str, Any] = {}
    for name, kind in plan.items():
        if kind != "nbits":
            continue
        e = weights[name]
        node = by_output[nbits_nodes[name]]
        _, q, d = _weight_parts(c, e)  # q: (N, K) in -8..7, d: (N, K/32 blocks)
        n_out, k = q.shape
        nb = d.shape[1]
        u = np.zeros((n_out, nb * QK), np.uint8)
        u[:, :k] = (q + 8).astype(np.uint8)
        u[:, k:] = 8  # padding decodes to 0
        u = u.reshape(n_out, nb, QK)
        packed = (u[:, :, 0::2] | (u[:, :, 1::2] << 4)).astype(np.uint8)  # element 2j low nibble
        b_name, s_name = names(f"{name}_nbits"), names(f"{name}_nbits_scales")
        replaced[name] = [numpy_helper.from_array(packed, b_name),
                          numpy_helper.from_array(d.astype(np.float32).reshape(-1), s_name)]
        new = helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output),
                               name=node.name or names(f"{name}_MatMulNBits"), domain="com.microsoft",
                               K=k, N=n_out, bits=4, block_size=QK)
        node.CopyFrom(new)
    if replaced:
        add_opset(model, "com.microsoft", 1)

    n_acts = add_activation_qdq(model, targets, names)

    front = []  # weight DequantizeLinear nodes (their inputs are initializers)
    values: dict[str, list] = {}
    for name, e in weights.items():
        kind = plan[name]
        if kind == "nbits":
            values[name] = replaced[name]
            continue
        if kind == "float":
            values[name] = [numpy_helper.from_array(dequantized_value(c, e), name)]
            continue
        qtype, q, d = _weight_parts(c, e)
        fdtype = np.float16 if e["dtype"] == "float16" else np.float32
        dims, layout = tuple(e["shape"]), e["layout"]
        qn, sn, zn = names(f"{name}_quantized"), names(f"{name}_scale"), names(f"{name}_zero_point")
        if kind == "per_channel":
            s = d[:, 0].copy()
            s[s == 0] = 1.0  # an all-zero row: q is 0, any scale gives 0
            if layout == "in_out":
                qv, axis = q.T, 1
            elif layout == "conv":
                qv, axis = q.reshape(dims), 0
            else:
                qv, axis = q, 0
            zeros = np.zeros(s.shape, np.int8)
            values[name] = [numpy_helper.from_array(np.ascontiguousarray(qv.astype(np.int8)), qn),
                            numpy_helper.from_array(s.astype(fdtype), sn),
                            numpy_helper.from_array(zeros, zn)]
            front.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [name], axis=axis,
                                          name=names(f"{name}_DequantizeLinear")))
            continue
        # block-wise
        if layout == "in_out":
            qv, sv, axis = q.T, d.T, 0
        else:
            qv, sv, axis = q, d, 1
        zeros = np.zeros(sv.shape, np.int8)
        if qtype == "int4":
            qt, zt = _int4_tensor(qn, qv), _int4_tensor(zn, zeros)
        else:
            qt, zt = numpy_helper.from_array(np.ascontiguousarray(qv.astype(np.int8)), qn), numpy_helper.from_array(zeros, zn)
        vals = [qt, numpy_helper.from_array(np.ascontiguousarray(sv.astype(fdtype)), sn), zt]
        out = name if layout != "conv" else names(f"{name}_2d")
        front.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], axis=axis, block_size=QK,
                                      name=names(f"{name}_DequantizeLinear")))
        if layout == "conv":
            shp = names(f"{name}_shape")
            vals.append(numpy_helper.from_array(np.array(dims, np.int64), shp))
            front.append(helper.make_node("Reshape", [out, shp], [name], name=names(f"{name}_Reshape")))
        values[name] = vals

    inits = []
    for t in g.initializer:
        inits.extend(values.get(t.name, [t]))
    from .model import set_repeated

    set_repeated(g.initializer, inits)
    set_repeated(g.node, front + list(g.node))
    model.producer_name, model.producer_version = "qconvert", c.metadata.get("qconvert.version", "")

    output.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < _PROTO_LIMIT:
        out = AtomicFile(output)  # complete or absent, even after a SIGKILL
        try:
            out.file.write(model.SerializeToString(deterministic=True))
        except BaseException:
            out.discard()
            raise
        out.commit()
    else:
        tmp = output.with_name(f".{output.name}.tmp")
        try:
            onnx.save(model, str(tmp), save_as_external_data=True, location=output.name + ".data")
            tmp.replace(output)
        finally:
            tmp.unlink(missing_ok=True)
    counts = {k: sum(1 for v in plan.values() if v == k) for k in ("per_channel", "blocked", "nbits", "float")}
    return {
        "output": str(output),
        "file_bytes": output.stat().st_size,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "weights": counts,
        "activations": n_acts,
        "nodes": len(g.node),
    }
