"""ONNX model -> container: weight schemes per tensor, optional static activation calibration.

Methods (``qconvert quantize model.onnx --method ... --bits ...``):

| options | weights of MatMul / Gemm / Conv |
|---|---|
| ``rtn --bits 8`` (default) | ``int8``: per-output-channel symmetric int8 (Q8_0 bytes, one scale per row) |
| ``rtn --bits 8 --group 32`` | ``Q8_0`` blocks of 32 |
| ``rtn --bits 4`` | ``Q4_0`` blocks of 32 |
| ``w8a8`` | ``int8`` weights; needs ``--calib`` |
| ``f32`` / ``f16`` | unquantized (a float reference) |

``--calib DIR`` (``.npy`` / ``.npz`` model inputs) with ``--observer minmax|percentile|entropy|mse``
adds static uint8 activation ranges for the data input of every quantized node (W8A8 with
int8 weights). ``--keep REGEX`` leaves matching weights in float; ``--tensor-type REGEX=TYPE``
(TYPE: int8, Q8_0, Q4_0, F16, F32) picks a scheme per weight.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..container import ContainerWriter, TensorSpec
from ..errors import QConvertError
from ..plan import ConvertResult, TensorPlan
from .quant import SCHEME_TYPE, SCHEMES, encode, padded

ONNX_METHODS = ("rtn", "w8a8", "f32", "f16")


def resolve_scheme(method: str, bits: int | None, group: int | None, sym: bool) -> tuple[str, dict[str, Any]]:
    """The default weight scheme of a method, and the recipe fields that describe it."""
    if method in ("f32", "f16"):
        return method.upper(), {"bits": None, "group": None, "sym": None}
    if method not in ONNX_METHODS:
        raise QConvertError(
            f"method {method!r} is not available for ONNX models; use rtn (--bits 8: per-channel int8,"
            " --bits 8 --group 32: Q8_0, --bits 4: Q4_0), w8a8 (with --calib) or f32/f16"
        )
    if not sym:
        raise QConvertError("ONNX weights are quantized symmetrically (int8, Q8_0, Q4_0); --asym is not supported")
    bits = 8 if bits is None else bits
    if method == "w8a8" and bits != 8:
        raise QConvertError(f"w8a8 stores 8-bit weights; --bits {bits} is not supported")
    if bits == 8 and group is None:
        return "int8", {"bits": 8, "group": None, "sym": True}
    if bits == 8 and group == 32:
        return "Q8_0", {"bits": 8, "group": 32, "sym": True}
    if bits == 4 and group in (None, 32):
        return "Q4_0", {"bits": 4, "group": 32, "sym": True}
    raise QConvertError(
        f"ONNX models take --bits 8 (per-channel int8, or Q8_0 with --group 32) or --bits 4 (Q4_0, groups of 32);"
        f" not --bits {bits}" + (f" --group {group}" if group is not None else "")
    )


def _compile(pattern: str, option: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QConvertError(f"{option}: invalid regular expression {pattern!r} ({e})") from None


def _overrides(items: list[str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        scheme = {s.lower(): s for s in SCHEMES}.get(type_name.strip().lower())
        if not sep or not pattern or scheme is None:
            raise QConvertError(f"--tensor-type for ONNX models takes REGEX=TYPE with TYPE one of {', '.join(SCHEMES)}; got {item!r}")
        out.append((_compile(pattern, "--tensor-type"), scheme))
    return out


def plan_schemes(refs: dict, default: str, keep: str | None, tensor_types: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (scheme, reason): ``--tensor-type`` first, then ``--keep``, then the method's default."""
    keep_re = _compile(keep, "--keep") if keep else None
    overrides = _overrides(list(tensor_types))
    out = {}
    for name, r in refs.items():
        if r.role != "weight":
            out[name] = (r.float_type, "large constant (not a weight), stored as is")
            continue
        ops = "/".join(sorted({c.op for c in r.consumers}))
        scheme = next((sch for pattern, sch in overrides if pattern.search(name)), None)
        if scheme is not None:
            why = f"{ops} weight, --tensor-type {scheme}"
        elif keep_re is not None and keep_re.search(name):
            scheme, why = r.float_type, f"{ops} weight, --keep"
        else:
            scheme = default
            why = {"int8": f"{ops} weight, per-channel int8", "F32": f"{ops} weight, float32",
                   "F16": f"{ops} weight, float16"}.get(scheme, f"{ops} weight, {scheme} blocks")
        k = r.rows_shape[-1]
        if scheme not in ("F32", "F16") and k % 32:
            why += f", rows padded {k}->{padded(k)}"
        out[name] = (scheme, why)
    return out


def quantize_onnx(
    source: str | Path,
    output: str | Path,
    method: str = "rtn",
    bits: int | None = None,
    group: int | None = None,
    sym: bool = True,
    keep: str | None = None,
    tensor_types: list[str] | tuple[str, ...] = (),
    calib: str | Path | None = None,
    observer: str | None = None,
    engine: str | None = None,
    imatrix: str | Path | None = None,
    smooth: float | None = None,
    act_mode: str = "static",
    progress: Callable[[int, int, TensorPlan], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
):
    """Quantize an ONNX model into a container (see the module docstring)."""
    from ..sources.onnx import open_onnx
    from .calibrate import activation_types, calibration_samples, collect_ranges
    from .model import FLOAT, graph_bytes, input_specs, weights_map

    default, recipe_bits = resolve_scheme(method, bits, group, sym)
    if method == "w8a8" and calib is None:
        raise QConvertError("w8a8 on an ONNX model needs --calib DIR (a folder of .npy model inputs) for the activation ranges")
    if imatrix is not None:
        raise QConvertError("--imatrix is for language models; ONNX models calibrate activations with --calib DIR")
    if smooth is not None:
        raise QConvertError("--smooth (SmoothQuant) is for llama-family models, not ONNX graphs")
    if act_mode != "static":
        raise QConvertError(f"ONNX activations are quantized statically (--act-mode static), not {act_mode!r}")
    if observer is not None and observer.lower() != "minmax" and calib is None:
        raise QConvertError("--observer picks how --calib data sets activation ranges; give --calib DIR too")
    observer = (observer or "minmax").lower()
    if calib is not None:
        from ..observers import make_observer

        make_observer(observer)  # fail early on an unknown name
    started = time.perf_counter()
    output = Path(output)
    src = open_onnx(source)
    refs = src.refs
    if not any(r.role == "weight" for r in refs.values()):
        raise QConvertError(f"{Path(source).name} has no MatMul, Gemm or Conv node with a constant float weight; nothing to quantize")
    schemes = plan_schemes(refs, default, keep, list(tensor_types))

    activations = None
    calib_info = None
    if calib is not None:
        acts: dict[str, list[int]] = {}
        for name, r in refs.items():
            if r.role != "weight" or schemes[name][0] in ("F32", "F16"):
                continue
            for cons in r.consumers:
                if cons.activation is not None:
                    acts.setdefault(cons.activation, []).append(cons.node)
        types = activation_types(src.stripped)
        acts = {t: sorted(set(n)) for t, n in acts.items() if types.get(t, FLOAT) == FLOAT}
        if not acts:
            raise QConvertError("--calib: no quantized node has a float32 data input to calibrate")
        samples, calib_info = calibration_samples(calib, input_specs(src.stripped))
        ranges, engine_label = collect_ranges(src.model, list(acts), samples, observer, engine, calib_progress)
        activations = {
            "observer": observer,
            "dtype": "uint8",
            "scheme": "per-tensor asymmetric",
            "tensors": {t: {**ranges[t], "nodes": acts[t]} for t in acts},
        }
        calib_info.update({"observer": observer, "activations": "uint8 asymmetric per-tensor", "tensors": len(acts),
                           "engine": engine_label})

    plans: list[TensorPlan] = []
    stored: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for name, r in refs.items():
        scheme, why = schemes[name]
        shape = r.rows_shape if scheme in ("F32", "F16") else (r.rows_shape[0], padded(r.rows_shape[-1]))
        type_name = SCHEME_TYPE[scheme]
        stored[name] = (scheme, type_name, shape)
        plans.append(TensorPlan(name, tuple(shape), r.float_type, type_name, why))

    source_bytes = sum((4 if r.float_type == "F32" else 2) * int(_prod(r.dims)) for r in refs.values())
    provenance = dict(src.provenance)
    provenance["tensor_bytes"] = source_bytes
    recipe = {
        "method": method,
        "mix": f"onnx-{default.lower()}",
        **recipe_bits,
        "keep": keep,
        "tensor_types": list(tensor_types),
        "calibration": calib_info,
        "imatrix": None,
        "seed": None,
        "weights": {"int8": "per-channel int8 (Q8_0 bytes, one scale per row)", "Q8_0": "Q8_0 blocks of 32",
                    "Q4_0": "Q4_0 blocks of 32", "F32": "float32", "F16": "float16"}[default],
    }
    metadata: dict[str, Any] = {
        "qconvert.version": __version__,
        "model.architecture": "onnx",
        "model.config": src.config,
        "recipe": recipe,
        "source": provenance,
        "onnx.graph": graph_bytes(src.stripped),
        "onnx.weights": weights_map(refs, stored),
    }
    if activations is not None:
        metadata["onnx.activations"] = activations
    specs = [TensorSpec(p.name, p.shape, p.type_name) for p in plans]
    with ContainerWriter(output, metadata, specs) as writer:
        for i, plan in enumerate(plans):
            r = refs[plan.name]
            raw, shape = encode(stored[plan.name][0], r.load_rows())
            assert tuple(shape) == plan.shape, (shape, plan.shape)
            writer.write(plan.name, raw)
            if progress is not None:
                progress(i + 1, len(plans), plan)
    src.close()
    return ConvertResult(output, plans, time.perf_counter() - started, provenance)


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
