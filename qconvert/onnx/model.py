"""ONNX graphs: loading (external data included), finding the weights, the graph a container stores.

Weights are the second input of ``MatMul``, ``Gemm`` and ``Conv`` nodes of the main graph when
that input is a constant: a graph initializer or the output of a ``Constant`` node. Layouts
(how an ONNX weight maps to the container's ``(out, in)`` rows, FORMAT.md §9):

- ``in_out``: ``MatMul`` B ``(in, out)``, ``Gemm`` B with ``transB=0``: stored transposed;
- ``out_in``: ``Gemm`` B with ``transB=1``: stored as is;
- ``conv``: ``Conv`` W ``(out, in/group, k...)``: stored as ``out`` rows of ``in/group·prod(k)``;
- ``as_is``: another large float initializer (``>= BIG_CONSTANT`` values): stored unchanged
  in its own float type, so that the stored graph stays small.

The stored graph (metadata ``onnx.graph``) is the model with each of these tensors replaced by
a *placeholder* initializer: same name, dims and data type, no data, ``data_location`` =
EXTERNAL with ``external_data`` ``location`` = ``qconvert-container`` and ``qconvert.tensor`` =
the container tensor's name. ``Constant`` nodes that held weights become such initializers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QConvertError

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
CONTAINER_LOCATION = "qconvert-container"
TENSOR_KEY = "qconvert.tensor"
BIG_CONSTANT = 65536  # other float initializers this large are stored as container tensors
ARCHITECTURE = "onnx"

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto data types
_DTYPE_NAMES = {FLOAT: "float32", FLOAT16: "float16"}
_CONTAINER_FLOAT = {FLOAT: "F32", FLOAT16: "F16"}


def onnx_module():
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        raise QConvertError("ONNX support needs the onnx package (pip install onnx)") from None
    return onnx


def _default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")


def node_label(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


@dataclass
class Consumer:
    node: int  # index in the stored graph's node list
    op: str
    name: str
    activation: str | None  # the node's data input, when it is not a constant


@dataclass
class ConstRef:
    """A constant tensor the container holds (a weight, or a large other initializer)."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    origin: str  # "initializer" | "constant" (a Constant node)
    role: str  # "weight" | "constant"
    layout: str  # "in_out" | "out_in" | "conv" | "as_is"
    consumers: list[Consumer] = field(default_factory=list)
    proto: Any = field(default=None, repr=False)  # the TensorProto with the data (source model only)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        d = self.dims
        if self.layout == "in_out":
            return (d[1], d[0])
        if self.layout == "conv":
            return (d[0], math.prod(d[1:]))
        return d

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.data_type]

    @property
    def float_type(self) -> str:
        return _CONTAINER_FLOAT[self.data_type]

    def load_rows(self) -> np.ndarray:
        """The values as float32, in the container orientation."""
        check_tensor_data(self.proto)
        try:
            arr = onnx_module().numpy_helper.to_array(self.proto)
        except Exception as e:  # onnx raises ValueError/TypeError/... on inconsistent protos
            raise QConvertError(f"ONNX tensor {self.name!r} cannot be read ({type(e).__name__}: {str(e)[:100]})") from None
        return to_rows(np.asarray(arr, dtype=np.float32).reshape(self.dims), self.layout)


def check_tensor_data(t) -> None:
    """A float TensorProto's data must hold exactly the elements its dims say (a hostile or
    corrupt model gives other lengths; negative dims are never valid for a tensor)."""
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise QConvertError(f"ONNX tensor {t.name!r} has a negative dimension {dims}")
    if t.data_type not in _DTYPE_NAMES or t.data_location == t.EXTERNAL:
        return
    n = math.prod(dims)
    itemsize = 4 if t.data_type == FLOAT else 2
    if t.HasField("raw_data") or not (t.float_data or t.int32_data):
        have, want = len(t.raw_data), n * itemsize
    else:
        have, want = len(t.float_data) if t.data_type == FLOAT else len(t.int32_data), n
    if have != want:
        raise QConvertError(
            f"ONNX tensor {t.name!r} of shape {dims} needs {want} {'bytes' if t.HasField('raw_data') else 'values'}"
            f" of data but holds {have}"
        )


def to_rows(arr: np.ndarray, layout: str) -> np.ndarray:
    if layout == "in_out":
        return np.ascontiguousarray(arr.T)
    if layout == "conv":
        return np.ascontiguousarray(arr.reshape(arr.shape[0], -1))
    return np.ascontiguousarray(arr)


def from_rows(rows: np.ndarray, layout: str, dims: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_rows` (``rows`` already cropped to the real row length)."""
    if layout == "in_out":
        return np.ascontiguousarray(rows.T)
    return np.ascontiguousarray(rows.reshape(dims))


def find_constants(model) -> dict[str, ConstRef]:
    """The weights of MatMul/Gemm/Conv nodes (node order), then the other large float initializers."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts: dict[str, Any] = {}
    for n in g.node:
        if n.op_type == "Constant" and _default_domain(n) and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == a.TENSOR:
                    consts[n.output[0]] = a.t
    refs: dict[str, ConstRef] = {}
    for i, n in enumerate(g.node):
        if not _default_domain(n) or n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        w = n.input[1]
        t = inits.get(w)
        origin = "initializer"
        if t is None:
            t, origin = consts.get(w), "constant"
        if t is None or t.data_type not in _DTYPE_NAMES:
            continue
        check_tensor_data(t)
        dims = tuple(int(d) for d in t.dims)
        if n.op_type == "MatMul":
            ok, layout = len(dims) == 2, "in_out"
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            ok, layout = len(dims) == 2, "out_in" if trans_b else "in_out"
        else:
            ok, layout = len(dims) >= 3, "conv"
        if not ok or 0 in dims:
            continue
        a = n.input[0]
        activation = a if a and a not in inits and a not in consts else None
        ref = refs.get(w)
        if ref is None:
            ref = refs[w] = ConstRef(w, dims, t.data_type, origin, "weight", layout, proto=t)
        ref.consumers.append(Consumer(i, n.op_type, node_label(n, i), activation))
    for t in g.initializer:
        if t.name not in refs and t.data_type in _DTYPE_NAMES and math.prod(t.dims) >= BIG_CONSTANT:
            check_tensor_data(t)
            refs[t.name] = ConstRef(t.name, tuple(int(d) for d in t.dims), t.data_type, "initializer", "constant",
                                    "as_is", proto=t)
    return refs


# --------------------------------------------------------------------------- loading


def _external_locations(model) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors

    out = []
    for t in _get_all_tensors(model):
        if t.data_location == t.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value not in out:
                    out.append(e.value)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: str | Path):
    """(ModelProto with every tensor's data loaded, [(file name, Path)] it was read from)."""
    onnx = onnx_module()
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"no such file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise QConvertError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if not model.graph.node:
        raise QConvertError(f"{path} is not an ONNX model with a graph (no nodes)")
    where = text_problem(model)
    if where:
        raise QConvertError(f"{path} is not a readable ONNX model: its {where} is not UTF-8 text")
    base = path.resolve().parent
    files = [(path.name, path)]
    for loc in _external_locations(model):
        p = Path(loc)
        if p.is_absolute() or ".." in p.parts:
            raise QConvertError(f"{path.name} refers to external data {loc!r} outside its folder; refusing to read it")
        full = base / p
        if not full.is_file():
            raise QConvertError(f"{path.name} keeps weights in the external data file {loc!r}, which is missing from {base}")
        files.append((p.as_posix(), full))
    if len(files) > 1:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(base))
        except Exception as e:
            raise QConvertError(f"cannot read the external data of {path.name}: {e}") from None
    return model, files


# --------------------------------------------------------------------------- the stored graph


def set_repeated(field, items: list) -> None:
    """Replace the contents of a repeated message field (items may be its own elements)."""
    copies = []
    for it in items:
        c = type(it)()
        c.CopyFrom(it)
        copies.append(c)
    del field[:]
    field.extend(copies)


def placeholder(ref: ConstRef):
    onnx = onnx_module()
    t = onnx.TensorProto()
    t.name = ref.name
    t.dims.extend(ref.dims)
    t.data_type = ref.data_type
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", CONTAINER_LOCATION), (TENSOR_KEY, ref.name)):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def strip_model(model, refs: dict[str, ConstRef]):
    """A copy of ``model`` with every tensor of ``refs`` replaced by a placeholder."""
    onnx = onnx_module()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    names = set(refs)
    nodes = [n for n in g.node if not (n.op_type == "Constant" and _default_domain(n) and n.output and n.output[0] in names)]
    set_repeated(g.node, nodes)
    inits = [placeholder(refs[t.name]) if t.name in names else t for t in g.initializer]
    have = {t.name for t in g.initializer}
    inits += [placeholder(r) for r in refs.values() if r.name not in have]
    set_repeated(g.initializer, inits)
    set_repeated(g.input, [i for i in g.input if i.name not in names])  # IR < 4 lists initializers as inputs
    if m.ir_version < 4:
        m.ir_version = 4
    return m


def graph_bytes(model) -> bytes:
    return model.SerializeToString(deterministic=True)


def weights_map(refs: dict[str, ConstRef], schemes: dict[str, tuple[str, str, tuple[int, ...]]]) -> dict[str, Any]:
    """The ``onnx.weights`` metadata: ONNX tensor -> container tensor, shape, layout, scheme."""
    out = {}
    for name, r in refs.items():
        scheme, type_name, stored_shape = schemes[name]
        out[name] = {
            "tensor": name,
            "shape": list(r.dims),
            "dtype": r.dtype_name,
            "layout": r.layout,
            "origin": r.origin,
            "role": r.role,
            "scheme": scheme,
            "type": type_name,
            "stored_shape": list(stored_shape),
            "row_length": int(r.rows_shape[-1]),
            "consumers": [{"node": c.node, "op": c.op, "name": c.name} for c in r.consumers],
        }
    return out


# --------------------------------------------------------------------------- containers


def is_onnx_container(c) -> bool:
    return c.metadata.get("model.architecture") == ARCHITECTURE


def stored_graph(c):
    """The container's graph with placeholders (no weights loaded)."""
    onnx = onnx_module()
    if not is_onnx_container(c):
        raise QConvertError(f"{c.path} holds a {c.architecture} model, not an ONNX graph")
    raw = c.metadata.get("onnx.graph")
    if not isinstance(raw, (bytes, bytearray)):
        raise QConvertError(f"corrupt container {c.path}: the ONNX graph (metadata onnx.graph) is missing")
    try:
        model = onnx.load_from_string(bytes(raw))
    except Exception:
        raise QConvertError(f"corrupt container {c.path}: metadata onnx.graph is not a serialized ONNX model") from None
    where = text_problem(model)
    if where:
        raise QConvertError(f"corrupt container {c.path}: the stored ONNX graph has a {where} that is not UTF-8 text")
    _check_external_refs(c, model)
    return model


def text_problem(message) -> str | None:
    """The first string field of a protobuf message that is not UTF-8 text, or None.

    ONNX's .proto is proto2, whose parser hands an invalid-UTF-8 ``string`` field back as
    ``bytes``: an op type or a tensor name would then be bytes where every caller expects str.
    Repeated scalars (tensor data) are skipped; only messages and strings are visited."""
    from google.protobuf.descriptor import FieldDescriptor

    stack = [message]
    while stack:
        msg = stack.pop()
        for desc, value in msg.ListFields():
            if desc.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(value if _is_repeated(desc) else [value])
            elif desc.type == FieldDescriptor.TYPE_STRING:
                values = value if _is_repeated(desc) else [value]
                if any(not isinstance(v, str) for v in values):
                    return f"{msg.DESCRIPTOR.name}.{desc.name}"
    return None


def _is_repeated(desc) -> bool:
    repeated = getattr(desc, "is_repeated", None)  # protobuf >= 5.28; label is deprecated
    return repeated if isinstance(repeated, bool) else desc.label == desc.LABEL_REPEATED


def _check_external_refs(c, model) -> None:
    """Every tensor of a stored graph with external data is a placeholder for a container
    tensor. Any other external reference (an absolute path, ``../``) would make ``run`` read, and
    ``export`` point at, a file outside the container: refused."""
    from onnx.external_data_helper import _get_all_tensors

    weights = container_weights(c)
    n_nodes = len(model.graph.node)
    for name, e in weights.items():
        if any(not 0 <= x["node"] < n_nodes for x in e["consumers"]):
            raise QConvertError(f"corrupt container {c.path}: onnx.weights entry {name!r} names a node the stored graph lacks")
    for t in _get_all_tensors(model):
        if t.data_location != t.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        if entries.get("location") != CONTAINER_LOCATION or entries.get(TENSOR_KEY) not in weights:
            raise QConvertError(
                f"corrupt container {c.path}: the stored ONNX graph refers to the external data"
                f" {entries.get('location')!r} for tensor {t.name!r}; only the container's own tensors may be external"
            )


_LAYOUTS = ("in_out", "out_in", "conv", "as_is")


def container_weights(c) -> dict[str, dict]:
    """``onnx.weights``, each entry checked against its container tensor (a hostile file with
    valid checksums must give one sentence, not a KeyError deep in ``run`` or ``export``)."""
    weights = c.metadata.get("onnx.weights") or {}
    for name, e in weights.items():
        problem = _weight_entry_problem(c, e)
        if problem:
            raise QConvertError(f"corrupt container {c.path}: onnx.weights entry {name!r} {problem}")
    return weights


def _weight_entry_problem(c, e: Any) -> str | None:
    if not isinstance(e, dict):
        return "is not a JSON object"
    ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
    if not isinstance(e.get("tensor"), str) or e["tensor"] not in c.tensors:
        return "names no tensor of the container"
    if not ints(e.get("shape")) or e.get("dtype") not in ("float32", "float16") or e.get("layout") not in _LAYOUTS:
        return "has a malformed shape, dtype or layout"
    if type(e.get("row_length")) is not int or not isinstance(e.get("type"), str) or not isinstance(e.get("scheme"), str):
        return "has a malformed row_length, type or scheme"
    if e.get("role") not in ("weight", "constant"):
        return "has a malformed role"
    cons = e.get("consumers")
    if not isinstance(cons, list) or not all(
        isinstance(x, dict) and type(x.get("node")) is int and isinstance(x.get("op"), str) for x in cons
    ):
        return "has malformed consumers"
    shape, info = e["shape"], c.tensors[e["tensor"]]
    layout, stored = e["layout"], info.shape
    if layout == "as_is":
        ok = list(stored) == shape
    elif layout in ("in_out", "out_in"):
        rows, cols = (shape[1], shape[0]) if layout == "in_out" else (shape[0], shape[1] if len(shape) > 1 else -1)
        ok = len(shape) == 2 and len(stored) == 2 and stored[0] == rows and e["row_length"] == cols <= stored[1]
    else:
        ok = (len(shape) >= 3 and len(stored) == 2 and stored[0] == shape[0]
              and e["row_length"] == math.prod(shape[1:]) <= stored[1])
    return None if ok else f"does not match the shape {list(stored)} of tensor {e['tensor']!r}"


def container_activations(c) -> dict[str, Any] | None:
    return c.metadata.get("onnx.activations")


def dequantized_value(c, entry: dict) -> np.ndarray:
    """A stored tensor back in its ONNX shape and dtype (quantized ones dequantized)."""
    rows = c.tensor(entry["tensor"])
    dims = tuple(entry["shape"])
    if entry["layout"] != "as_is":
        rows = rows.reshape(rows.shape[0], -1)[:, : entry["row_length"]]
    arr = from_rows(rows, entry["layout"], dims)
    return arr.astype(np.float16 if entry["dtype"] == "float16" else np.float32)


def replace_initializers(model, values: dict[str, Any]) -> None:
    """Swap initializers by name for new TensorProtos (keeps their order)."""
    g = model.graph
    set_repeated(g.initializer, [values.get(t.name, t) for t in g.initializer])


def materialize(c, model=None):
    """The stored graph with every placeholder filled with its (dequantized) values."""
    onnx = onnx_module()
    model = stored_graph(c) if model is None else model
    values = {}
    for name, entry in container_weights(c).items():
        values[name] = onnx.numpy_helper.from_array(dequantized_value(c, entry), name)
    replace_initializers(model, values)
    return model


# --------------------------------------------------------------------------- inputs


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype | None
    shape: list[Any] | None  # ints, or str/None for dynamic dimensions; None: unknown rank

    def describe(self) -> str:
        dt = "?" if self.dtype is None else str(self.dtype)
        if self.shape is None:
            return f"{self.name}: {dt} (any shape)"
        return f"{self.name}: {dt} [{', '.join(str(d) if d is not None else '?' for d in self.shape)}]"

    def accepts(self, arr: np.ndarray) -> bool:
        if self.dtype is not None and arr.dtype != self.dtype:
            return False
        if self.shape is None:
            return True
        return arr.ndim == len(self.shape) and all(not isinstance(d, int) or d == s for d, s in zip(self.shape, arr.shape))


def _value_spec(vi) -> InputSpec:
    onnx = onnx_module()
    tt = vi.type.tensor_type
    dtype = None
    if tt.elem_type:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = None
    shape = None
    if tt.HasField("shape"):
        # a negative dim_value is how some exporters (PaddlePaddle's) mark a dynamic dimension
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                 for d in tt.shape.dim]
    return InputSpec(vi.name, dtype, shape)


def input_specs(model) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    return [_value_spec(vi) for vi in model.graph.input if vi.name not in inits]


def output_specs(model) -> list[InputSpec]:
    return [_value_spec(vi) for vi in model.graph.output]


def describe_inputs(specs: list[InputSpec]) -> str:
    return "; ".join(s.describe() for s in specs)


def model_config(model) -> dict[str, Any]:
    """What ``model.config`` holds for an ONNX source (there is no Hugging Face config)."""

    def spec_json(s: InputSpec) -> dict:
        return {"name": s.name, "dtype": None if s.dtype is None else str(s.dtype),
                "shape": None if s.shape is None else [d for d in s.shape]}

    return {
        "model_type": "onnx",
        "ir_version": int(model.ir_version),
        "opset_import": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "graph_name": model.graph.name,
        "inputs": [spec_json(s) for s in input_specs(model)],
        "outputs": [spec_json(s) for s in output_specs(model)],
    }


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if _default_domain(n) else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def onnx_summary(c) -> dict[str, Any]:
    """What ``inspect`` adds for an ONNX container: op counts, weights and how each is stored."""
    model = stored_graph(c)
    weights = container_weights(c)
    acts = container_activations(c)
    rows = []
    for name, e in weights.items():
        rows.append({
            "name": name,
            "ops": sorted({x["op"] for x in e["consumers"]}) or ["-"],
            "shape": e["shape"],
            "layout": e["layout"],
            "origin": e["origin"],
            "scheme": e["scheme"],
            "type": e["type"],
            "quantized": e["scheme"] not in ("F32", "F16"),
        })
    return {
        "ops": op_counts(model),
        "nodes": len(model.graph.node),
        "inputs": [s.describe() for s in input_specs(model)],
        "outputs": [s.describe() for s in output_specs(model)],
        "weights": rows,
        "quantized_weights": sum(r["quantized"] for r in rows),
        "activations": None if not acts else {
            "observer": acts.get("observer"), "dtype": acts.get("dtype"), "tensors": len(acts.get("tensors", {})),
        },
    }
