"""GPTQ / AWQ / group-wise RTN over a whole source: calibration set, sequential driver, and the
encoding of each quantized matrix into the group-wise integer block family (I{bits}G{group}).

A matrix whose input width the requested group does not divide (SmolLM2's 576 with group
128) uses the largest of 64 and 32 that does -- the same for every method, so comparisons stay
fair -- and the plan records it. Act-order results are stored with their columns in
quantization order, the permutation in the tensor's ``input_perm`` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ..errors import QConvertError
from ..sources.base import Source

GROUPS = (128, 64, 32)
BITS = (2, 3, 4, 8)


def group_for(in_features: int, group: int) -> int | None:
    """The group used for rows of ``in_features``: ``group``, else 64 or 32; None if none fits
    (such a matrix stays in float, as the F16 fallback of the other methods)."""
    if group not in GROUPS:
        raise QConvertError(f"--group must be one of {', '.join(map(str, GROUPS))} for group-wise storage, not {group}")
    for g in (group, *[g for g in GROUPS if g < group]):
        if in_features % g == 0:
            return g
    return None


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise QConvertError(f"group-wise storage supports --bits {', '.join(map(str, BITS))}, not {bits}")


@dataclass
class Encoded:
    type_name: str
    raw: np.ndarray
    params: dict = field(default_factory=dict)


def encode_linear(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, perm: np.ndarray | None) -> Encoded:
    from ..blocks.groupwise import pack_groupwise, type_name

    group = q.shape[1] // scales.shape[1]
    raw = pack_groupwise(q, scales, zeros, bits, group)
    params = {"input_perm": [int(i) for i in perm]} if perm is not None else {}
    return Encoded(type_name(bits, group), raw, params)


def rtn_encode(values: np.ndarray, bits: int, group: int, sym: bool, mse: bool = False) -> Encoded:
    from .quantizer import rtn_groupwise

    g = group_for(values.shape[1], group)
    assert g is not None, "the plan falls back to F16 for rows no group divides"
    q, scales, zeros = rtn_groupwise(values, bits, g, sym, mse)
    return encode_linear(q, scales, zeros, bits, None)


def _tokenizer_for(source: Source):
    from ..runtime.tokenizer import Tokenizer

    meta = {"model.config": source.config}
    if source.tokenizer_json is not None:
        meta["tokenizer.json"] = source.tokenizer_json
    meta.update(source.extra_metadata)
    return Tokenizer.from_container(SimpleNamespace(metadata=meta, path=source.provenance.get("id")))


def run_calibrated(source: Source, method: str, bits: int, group: int, sym: bool, calib, n_samples: int,
                   seqlen: int, seed: int, damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False, mse: bool = False, progress=None) -> tuple[dict[str, Encoded], dict[str, np.ndarray], dict]:
    """Run GPTQ or AWQ; returns (encoded matrices, modified float tensors, recipe info)."""
    from ..calibration import calibration_set
    from . import sequential

    check_bits(bits)
    if source.architecture != "llama":
        raise QConvertError(f"{method} calibration supports llama-family models, not {source.architecture}")
    tok = _tokenizer_for(source)
    calib_set = calibration_set(tok, calib, n_samples, seqlen, seed)
    by_name = {t.name: t for t in source.tensors}

    def load(name: str) -> np.ndarray:
        if name not in by_name:
            raise QConvertError(f"the source lacks {name}, which {method} needs")
        values = by_name[name].load()
        if not np.isfinite(values).all():
            raise QConvertError(f"tensor {name} has NaN or infinite values; refusing to quantize it")
        return values.astype(np.float32)

    names = set(by_name)
    # One BLAS thread: the block math is many mid-sized products interleaved with numba
    # kernels, and OpenBLAS workers that spin between calls starve both on a loaded machine
    # (AWQ on stories260K, 2 busy cores: 13 s with one BLAS thread, 129 s with two).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return _run(source, method, bits, group, sym, calib_set, load, names, damp, act_order, static_groups, mse,
                    progress)


def _run(source, method, bits, group, sym, calib_set, load, names, damp, act_order, static_groups, mse, progress):
    from . import sequential

    hidden = int(source.config["hidden_size"])
    inter = int(source.config["intermediate_size"])
    g_hidden, g_inter = group_for(hidden, group), group_for(inter, group)
    if method == "gptq":
        result = sequential.gptq_model(load, source.config, names, calib_set.tokens, bits, group, sym, damp,
                                       act_order, static_groups, mse=mse, progress=progress, group_of=group_for)
    else:
        result = sequential.awq_model(load, source.config, names, calib_set.tokens, bits, group,
                                      progress=progress, group_of=group_for)
    encoded = {n: encode_linear(ql.q, ql.scales, ql.zeros, bits, ql.perm) for n, ql in result.linears.items()}
    info = {"calibration": calib_set.info, "groups_used": sorted({g for g in (g_hidden, g_inter) if g})}
    if method == "gptq":
        info.update({"damp": damp, "act_order": act_order, "static_groups": static_groups, "mse": mse})
    else:
        info["search_tokens"] = result.stats["search_tokens"]
    return encoded, result.floats, info
