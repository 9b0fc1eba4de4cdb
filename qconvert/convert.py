"""The conversion pipeline: source -> per-tensor plan -> block codecs -> container.

Tensors stream through one at a time (read, check, quantize, write, forget), so memory stays
near the largest tensor, and the container is written atomically.
"""

from __future__ import annotations


import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .blocks import by_name
from .container import ContainerWriter, TensorSpec
from .errors import QConvertError
from .methods.mixes import K_MIXES, MIXES, Mix, groupwise_mix
from .methods.rtn import rtn_mix
from .plan import ConvertResult, TensorPlan, plan_tensors
from .sources import Source, open_source

from .catalog import FLOAT_METHODS, METHODS  # noqa: F401  (METHODS: re-exported)
from .recipe import CALIBRATED_METHODS
# bitsandbytes' NF4: 64-weight blocks, absmax double-quantized (default) or kept as f32
NF4_MIXES = {True: Mix("nf4", "NF4_DQ", 1024), False: Mix("nf4-nodq", "NF4", 1024)}

# Called after each tensor: (index, total, plan).
Progress = Callable[[int, int, TensorPlan], None]


def build_recipe(method: str, mix: Mix, bits: int | None, group: int | None, sym: bool | None, keep: str | None,
                 tensor_types: list[str], imatrix: dict | None) -> dict:
    return {
        "method": method,
        "mix": mix.name,
        "bits": bits,
        "group": group,
        "sym": sym,
        "keep": keep,
        "tensor_types": list(tensor_types),
        "calibration": None,
        "imatrix": imatrix,
        "seed": None,
    }


def resolve_method(method: str, bits: int, group: int, sym: bool,
                   double_quant: bool = True) -> tuple[Mix, int | None, int | None, bool | None]:
    """The mix a method means, and the bits/group/sym that describe it in the recipe."""
    if method == "rtn":
        if group == 32 and bits in (4, 5, 8):
            return rtn_mix(bits, group, sym), bits, group, sym
        from .methods.calibrated import check_bits, group_for

        check_bits(bits)
        group_for(group, group)  # validates the group size
        return groupwise_mix(bits, group), bits, group, sym
    if method in CALIBRATED_METHODS:
        from .methods.calibrated import check_bits, group_for

        check_bits(bits)
        group_for(group, group)
        return groupwise_mix(bits, group), bits, group, sym if method.endswith("gptq") else False
    if method in FLOAT_METHODS or method in K_MIXES:
        return MIXES[method], None, None, None
    if method == "nf4":
        return NF4_MIXES[double_quant], 4, 64, None
    if method == "w8a8":  # matrices the method does not take (embedding, output) get Q8_0
        if bits not in (None, 8):
            raise QConvertError(f"w8a8 stores 8-bit weights; --bits {bits} is not supported")
        return MIXES["q8_0"], 8, None, True
    from .catalog import unknown_method_message

    raise QConvertError(unknown_method_message(method))


def container_metadata(source: Source, recipe: dict, plans: list[TensorPlan]) -> dict[str, Any]:
    source_bytes = 0
    for p in plans:
        source_bytes += by_name(p.source_type).nbytes(p.shape)
    provenance = dict(source.provenance)
    provenance["tensor_bytes"] = source_bytes
    fallbacks = {p.name: p.reason for p in plans if p.reason.startswith("fallback")}  # FORMAT.md §8
    meta: dict[str, Any] = {
        "qconvert.version": __version__,
        "model.architecture": source.architecture,
        "model.config": source.config,
        "recipe": {**recipe, "fallbacks": fallbacks} if fallbacks else recipe,
        "source": provenance,
    }
    if source.tokenizer_json is not None:
        meta["tokenizer.json"] = source.tokenizer_json
    for key in sorted(source.extra_metadata):
        meta[key] = source.extra_metadata[key]
    return meta


def _encode(plan: TensorPlan, tensor, importance: np.ndarray | None = None, values: np.ndarray | None = None,
            sym: bool | None = True, mse: bool = False) -> tuple[np.ndarray, dict]:
    """(raw bytes, params) of one tensor in its planned type."""
    if plan.copies_source and values is None:
        return tensor.load_raw(), {}
    if values is None:
        values = tensor.load()
    if not np.isfinite(values).all():
        bad = int(np.size(values) - np.isfinite(values).sum())
        raise QConvertError(f"tensor {plan.name} has {bad} NaN or infinite values; refusing to quantize it")
    rows = values.reshape(-1, plan.shape[-1])
    from .blocks.groupwise import parse_type

    groupwise = parse_type(plan.type_name)
    if groupwise is not None:  # group-wise RTN: symmetric or with zero points, per the recipe
        from .methods.calibrated import rtn_encode

        bits, group = groupwise
        return rtn_encode(rows, bits, group, bool(sym), mse).raw, {}
    return by_name(plan.type_name).quantize_with_params(rows, importance)


def _params_reserve(plan: TensorPlan) -> int:
    """Header bytes to keep for params known only after quantizing (NF4_DQ's double-quant state)."""
    bt = by_name(plan.type_name)
    if bt.params_max_len is None or plan.copies_source:
        return 0
    return bt.params_max_len(plan.shape)


def _calibrated_plan(plan: TensorPlan, encoded: dict, floats: dict) -> TensorPlan:
    """A matrix GPTQ/AWQ quantized takes the encoding's type; a folded norm is stored as F32."""
    from dataclasses import replace

    if plan.name in encoded:
        return replace(plan, type_name=encoded[plan.name].type_name, reason="calibrated")
    if plan.name in floats:
        float_type = plan.type_name if by_name(plan.type_name).is_float else "F32"
        return replace(plan, type_name=float_type, reason="scales folded in")
    return plan


def quantize(
    source: str | Path,
    output: str | Path,
    method: str = "rtn",
    bits: int | None = None,
    group: int | None = None,
    sym: bool = True,
    keep: str | None = None,
    tensor_types: list[str] | tuple[str, ...] = (),
    revision: str | None = None,
    imatrix: str | Path | None = None,
    calib: str | Path | None = None,
    calib_chunks: int | None = None,
    calib_samples: int = 32,
    calib_seqlen: int = 512,
    seed: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    double_quant: bool = True,
    progress: Progress | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    observer: str = "minmax",
    smooth: float | None = None,
    act_mode: str = "static",
    allow_requantize: bool = False,
    threads: int | None = None,
) -> ConvertResult:
    """Quantize a checkpoint (HF folder or hub id, or .gguf) into a qconvert container.

    A source that is already quantized (a Q4_1 GGUF, a GPTQ checkpoint) is re-quantized only with
    ``allow_requantize``; the float methods (f32/f16/bf16) dequantize it without asking.

    ``threads``: tensors encoded at once (default: all cores; 1: one after the other). The output
    is byte-identical whatever the number.

    >>> qconvert.quantize("../shared/models/stories260K", "s.q8", method="rtn", bits=8)  # doctest: +SKIP
    """
    started = time.perf_counter()
    from .outputs import check_output, remove_stale_temps

    check_output(output, inputs=[source], force=True)  # never onto the source, never onto a directory
    remove_stale_temps(output)
    if str(source).lower().endswith(".onnx"):  # ONNX graphs have their own pipeline: qconvert/onnx/
        from .onnx.convert import quantize_onnx

        return quantize_onnx(source, output, method=method, bits=bits, group=group, sym=sym, keep=keep,
                             tensor_types=list(tensor_types), calib=calib, observer=observer, imatrix=imatrix,
                             smooth=smooth, act_mode=act_mode, progress=progress, calib_progress=calib_progress)
    calibrated = method in CALIBRATED_METHODS
    # A GPTQ/AWQ checkpoint is imported as it is with --method import, or with the default
    # method when no --bits/--group asks for something else (sources/prequantized.py).
    importing, default_method = method == "import", method == "rtn" and bits is None and group is None
    bits = bits if bits is not None else (4 if calibrated else 8)
    group = group if group is not None else (128 if calibrated else 32)
    mix, r_bits, r_group, r_sym = resolve_method("f32" if importing else method, bits, group, sym, double_quant)
    importance: dict[str, np.ndarray] = {}
    imatrix_info = None
    if imatrix is not None and calib is not None:
        raise QConvertError("give either --imatrix FILE or --calib TEXT (which computes one), not both")
    if mse:
        from .blocks.groupwise import parse_type

        if not (method.endswith("gptq") or (method == "rtn" and parse_type(mix.default) is not None)):
            raise QConvertError("--mse applies to gptq and to group-wise rtn (--bits 2/3 or --group 64/128)")
    output = Path(output)
    warnings = []
    with open_source(str(source), revision=revision) as src:
        from .runtime.tokenizer import check_source_tokenizer

        check_source_tokenizer(src)  # a broken tokenizer is refused now, not at `run` (issue #14 B.2)
        if not allow_requantize and not importing and method not in FLOAT_METHODS:
            _refuse_requantizing(src, method, mix, keep, tensor_types, imatrix is not None or calib is not None,
                                 default_method)
        if imatrix is not None:
            from .arch import ARCHITECTURES
            from .imatrix import load_imatrix

            family = next((a for a in ARCHITECTURES if a.name == src.architecture), None)
            importance, imatrix_info = load_imatrix(imatrix, family)
        elif calib is not None and not calibrated and method != "w8a8":
            from .imatrix import imatrix_for_source

            # the importance matrix of the open source, in memory (no temporary model)
            importance, imatrix_info = imatrix_for_source(src, calib, chunks=calib_chunks, progress=calib_progress)
        recipe = build_recipe(method, mix, r_bits, r_group, r_sym, keep, list(tensor_types), imatrix_info)
        if mse:
            recipe["mse"] = True
        if src.tokenizer_json is None and not src.extra_metadata.get("tokenizer.gguf"):
            warnings.append(f"{source} has no tokenizer (no tokenizer.json, no GGUF tokenizer metadata): `qconvert run`,"
                            " `eval` and GGUF export of the result will fail; add tokenizer.json to the source")
        if importance and not any(t.name in importance for t in src.tensors):
            raise QConvertError("the importance matrix names none of this model's tensors: it was made for another model")
        from .arch import by_name as arch_by_name

        arch = arch_by_name(src.architecture)
        plans = plan_tensors(
            src.tensors, arch, src.config, mix, keep=keep, tensor_types=list(tensor_types), has_imatrix=bool(importance)
        )
        from .sources.prequantized import import_plans, is_prequantized

        by_tensor = {t.name: t for t in src.tensors}
        prequantized = any(is_prequantized(t) for t in src.tensors)
        if importing and not prequantized:
            raise QConvertError("--method import needs a GPTQ or AWQ checkpoint (config.json with a quantization_config)")
        if prequantized and (importing or default_method):
            importing = True
            plans = import_plans(plan_tensors(src.tensors, arch, src.config, MIXES["f32"], keep=keep,
                                              tensor_types=list(tensor_types), has_imatrix=bool(importance)), by_tensor)
            recipe = build_recipe("import", mix, None, None, None, keep, list(tensor_types), imatrix_info)
            recipe.update(mix=None, **src.provenance["quantization"])
            from .blocks.groupwise import parse_type

            recipe["groups_used"] = sorted({parse_type(p.type_name)[1] for p in plans if p.reason == "imported"})
        encoded, floats = {}, {}
        # the methods take the matrices the plan left to the mix (not --keep/--tensor-type/output)
        targets = {p.name for p in plans if p.reason not in ("--keep", "--tensor-type", "output", "float-only")}
        if calibrated:
            from .recipe import run_calibrated

            encoded, floats, info = run_calibrated(
                src, method, targets, bits, group, sym, calib, calib_samples, calib_seqlen, seed, damp=damp,
                act_order=act_order, static_groups=static_groups, mse=mse, progress=calib_progress,
            )
            recipe.update(info)
            recipe["seed"] = seed
            plans = [_calibrated_plan(p, encoded, floats) for p in plans]
        elif method == "w8a8":
            from .recipe import run_w8a8

            encoded, floats, info = run_w8a8(
                src, targets, calib, calib_samples, calib_seqlen, seed, observer=observer, smooth=smooth,
                act_mode=act_mode, progress=calib_progress,
            )
            recipe.update(info)
            recipe["seed"] = seed if info["calibration"] is not None else None
            plans = [_calibrated_plan(p, encoded, floats) for p in plans]
        metadata = container_metadata(src, recipe, plans)
        # a tensor stored as the source's own blocks keeps their params (an imported act-order permutation)
        specs = [TensorSpec(p.name, p.shape, p.type_name, encoded[p.name].params if p.name in encoded else
                            (getattr(by_tensor[p.name], "params", {}) if p.copies_source else {}),
                            extra_reserve=_params_reserve(p)) for p in plans]
        with ContainerWriter(output, metadata, specs) as writer:
            def encode_one(plan: TensorPlan) -> tuple[Any, dict]:
                if plan.name in encoded:
                    return encoded.pop(plan.name).raw, {}
                return _encode(plan, by_tensor[plan.name], importance.get(plan.name), floats.get(plan.name),
                               r_sym, mse)

            _write_all(writer, plans, encode_one, progress, threads)
        provenance = metadata["source"]
    return ConvertResult(output, plans, time.perf_counter() - started, provenance, warnings)


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _work_bytes(plan: TensorPlan) -> int:
    """A tensor's float32 size: what encoding it holds in memory, give or take a small factor."""
    return 4 * math.prod(plan.shape)


def _write_all(writer: ContainerWriter, plans: list[TensorPlan], encode_one: Callable[[TensorPlan], tuple[Any, dict]],
               progress: Progress | None, threads: int | None) -> None:
    """Encode every planned tensor and write it, in plan order.

    With ``threads`` > 1 a thread pool encodes several tensors at once (reading, converting and
    checking them overlap with the numba kernels), and the results are written in plan order, so
    the file is byte-identical to the serial one. Memory stays bounded (issue #15): at most
    ``threads`` tensors are in flight, and together their float32 sizes stay within the largest
    tensor's (a tensor that large is encoded alone).
    """
    n = len(plans)
    workers = min(threads if threads is not None else default_threads(), n)
    if threads is not None and threads < 1:
        raise QConvertError(f"threads must be at least 1, not {threads}")

    def done(i: int, plan: TensorPlan, raw: Any, params: dict) -> None:
        writer.write(plan.name, raw, extra=params or None)
        if progress is not None:
            progress(i + 1, n, plan)

    if workers <= 1:
        for i, plan in enumerate(plans):
            raw, params = encode_one(plan)
            done(i, plan, raw, params)
            del raw
        return
    import numba
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    kernel_threads = numba.get_num_threads()  # numba's count is per thread: the workers take the caller's
    budget = max(_work_bytes(p) for p in plans)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="qconvert-encode",
                              initializer=numba.set_num_threads, initargs=(kernel_threads,))
    pending: deque = deque()  # (index, plan, future, cost), in plan order
    in_flight, next_i = 0, 0
    try:
        for i in range(n):
            while next_i < n and len(pending) < workers:
                cost = _work_bytes(plans[next_i])
                if pending and in_flight + cost > budget:
                    break
                pending.append((next_i, plans[next_i], pool.submit(encode_one, plans[next_i]), cost))
                in_flight += cost
                next_i += 1
            index, plan, future, cost = pending.popleft()
            raw, params = future.result()
            in_flight -= cost
            del future
            done(index, plan, raw, params)
            del raw
    finally:
        for *_, future, _ in pending:
            future.cancel()
        pool.shutdown(wait=True)


def _refuse_requantizing(src: Source, method: str, mix: Mix, keep, tensor_types, has_imatrix: bool,
                         default_method: bool) -> None:
    """Refuse, before any slow work, to round a quantized source's blocks a second time."""
    from .sources.prequantized import is_prequantized
    from .summary import describe_source_quantization

    if not src.provenance.get("quantized"):
        return
    if default_method and any(is_prequantized(t) for t in src.tensors):
        return  # a GPTQ/AWQ checkpoint with the default method is imported as it is
    from .arch import by_name as arch_by_name

    plans = plan_tensors(src.tensors, arch_by_name(src.architecture), src.config, mix, keep=keep,
                         tensor_types=list(tensor_types), has_imatrix=has_imatrix)
    again = [p for p in plans if not p.copies_source and not by_name(p.source_type).is_float
             and not by_name(p.type_name).is_float]
    if again:
        raise QConvertError(
            f"{src.provenance.get('id')} is {describe_source_quantization(src.provenance)}; --method {method} would round"
            f" {len(again)} of its tensors a second time: pass --allow-requantize to do it anyway, or use"
            " --method f32/f16/bf16 to dequantize it"
        )
