"""Model inputs from ``.npy`` / ``.npz`` files, and static activation ranges from calibration runs.

Files: a ``.npy`` file feeds a single-input model: one sample (the input's dtype and shape,
dynamic dimensions free), or a stack of samples along a new leading axis. A ``.npz`` file is one
sample with one array per input name (any number of inputs). Anything else is a one-line error
that says what the model expects.

Calibration runs the float model on every sample of ``--calib DIR`` (files in name order),
reads every activation that feeds a quantized node (the data input of a quantized ``MatMul`` /
``Gemm`` / ``Conv``), streams it into one observer per tensor (``qconvert.observers``:
minmax, percentile, entropy, mse) and turns the observer's asymmetric 8-bit range into uint8
quantization parameters, as onnxruntime's ``compute_scale_zp`` does::

    lo = min(lo, 0); hi = max(hi, 0)
    scale = float32((hi - lo) / 255)            (1.0 when hi == lo)
    zero_point = clamp(round_half_even(-lo / scale), 0, 255)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import QConvertError
from .model import InputSpec, describe_inputs, onnx_module

Feeds = dict[str, np.ndarray]


def _load_array_file(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise QConvertError(f"{path.name} is not a plain numpy array file ({e})") from None
    except OSError as e:
        raise QConvertError(f"cannot read {path}: {e}") from None


def _mismatch(path: Path, got: str, specs: list[InputSpec], what: str) -> QConvertError:
    return QConvertError(f"{what} {path.name} holds {got}; the model expects {describe_inputs(specs)}")


def feeds_from_file(path: str | Path, specs: list[InputSpec], allow_stack: bool = True, what: str = "input file") -> list[Feeds]:
    """The samples one file holds (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise QConvertError(f"no such file: {path}")
    data = _load_array_file(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            arrays = {k: data[k] for k in data.files}
        names = [s.name for s in specs]
        if sorted(arrays) != sorted(names) or not all(s.accepts(arrays[s.name]) for s in specs):
            got = ", ".join(f"{k}: {a.dtype} {list(a.shape)}" for k, a in arrays.items()) or "no arrays"
            raise _mismatch(path, got, specs, what)
        return [{s.name: arrays[s.name] for s in specs}]
    arr = np.asarray(data)
    if len(specs) != 1:
        raise QConvertError(
            f"{what} {path.name} is one array but the model has {len(specs)} inputs ({describe_inputs(specs)});"
            " give an .npz file with one array per input name"
        )
    spec = specs[0]
    if spec.accepts(arr):
        return [{spec.name: arr}]
    if allow_stack and arr.ndim >= 1 and arr.shape[0] > 0 and spec.accepts(arr[0]):
        return [{spec.name: np.ascontiguousarray(a)} for a in arr]
    raise _mismatch(path, f"{arr.dtype} {list(arr.shape)}", specs, what)


def parse_run_inputs(items: list[str], specs: list[InputSpec]) -> Feeds:
    """``--input x.npy`` (single-input model), ``--input NAME=x.npy`` (repeatable) or ``--input x.npz``."""
    if not items:
        raise QConvertError(f"give --input FILE.npy (or NAME=FILE.npy, or an .npz); the model expects {describe_inputs(specs)}")
    named: dict[str, np.ndarray] = {}
    by_name = {s.name: s for s in specs}
    for item in items:
        name, sep, file = item.partition("=")
        if sep and name in by_name:
            named[name] = feeds_from_file(file, [by_name[name]], allow_stack=False)[0][name]
        elif sep and not Path(item).exists():
            raise QConvertError(f"the model has no input named {name!r}; it expects {describe_inputs(specs)}")
        else:
            named.update(feeds_from_file(item, specs, allow_stack=False)[0])
    missing = [s.name for s in specs if s.name not in named]
    if missing:
        raise QConvertError(f"no value for input(s) {', '.join(missing)}; the model expects {describe_inputs(specs)}")
    return {s.name: named[s.name] for s in specs}


def calibration_samples(folder: str | Path, specs: list[InputSpec]) -> tuple[list[Feeds], dict[str, Any]]:
    """Every sample of a ``--calib`` folder, and a description for the recipe."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QConvertError(f"--calib for an ONNX model is a folder of .npy/.npz model inputs; {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".npy", ".npz") and p.is_file())
    if not files:
        raise QConvertError(f"--calib folder {folder} has no .npy or .npz files; the model expects {describe_inputs(specs)}")
    samples: list[Feeds] = []
    h = hashlib.sha256()
    for p in files:
        samples += feeds_from_file(p, specs, what="calibration file")
        h.update(p.name.encode() + b"\0" + bytes.fromhex(_sha256(p)))
    info = {"folder": folder.name, "files": len(files), "samples": len(samples), "sha256": h.hexdigest()}
    return samples, info


def _sha256(p: Path) -> str:
    from .model import sha256_file

    return sha256_file(p)


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi == lo:
        return 1.0, 0
    scale = np.float32((hi - lo) / 255.0)
    if not np.isfinite(scale) or scale <= 0:
        raise QConvertError(f"activation range [{lo}, {hi}] cannot be quantized to uint8")
    zp = int(np.clip(np.rint(np.float32(-lo) / scale), 0, 255))
    return float(scale), zp


def activation_types(model) -> dict[str, int]:
    """elem type of every value the graph names (by shape inference; inputs and outputs too)."""
    onnx = onnx_module()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def collect_ranges(
    model,
    tensors: list[str],
    samples: list[Feeds],
    observer: str,
    engine: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    bits: int = 8,
) -> tuple[dict[str, dict[str, Any]], str]:
    """Run the float ``model`` on ``samples``; per tensor {range, scale, zero_point}; and the engine label."""
    from ..observers import make_observer
    from .engine import Session

    onnx = onnx_module()
    make_observer(observer)  # an unknown name fails before the runs
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    graph_inputs = {i.name for i in aug.graph.input}
    have = {o.name for o in aug.graph.output}
    for t in tensors:
        if t not in graph_inputs and t not in have:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    fetch = [t for t in tensors if t not in graph_inputs]
    sess = Session(aug, engine)
    observers = {t: make_observer(observer) for t in tensors}
    try:
        for i, feeds in enumerate(samples):
            res = sess.run(feeds, outputs=fetch)
            for t in tensors:
                observers[t].update(feeds[t] if t in graph_inputs else res[t])
            if progress is not None:
                progress(i + 1, len(samples))
    finally:
        label = sess.label
        sess.close()
    out = {}
    for t in tensors:
        lo, hi = observers[t].range(bits, symmetric=False)
        scale, zp = uint8_params(lo, hi)
        out[t] = {"range": [float(lo), float(hi)], "scale": scale, "zero_point": zp}
    return out, label
