"""Which block type each tensor gets.

Defaults follow llama.cpp's practice: 2-D weight matrices take the mix's types (see
``methods/mixes.py``: the default type, with bumps for attn_v / ffn_down / attn_output, and
Q6_K -- or Q8_0 where Q6_K cannot hold the rows -- for the output projection or the tied
token embedding); norms, biases, 1-D tensors and positional / token-type embeddings stay in
float. ``--keep REGEX`` and ``--tensor-type REGEX=TYPE`` override per tensor.

A tensor whose row length the chosen type cannot hold falls back as llama.cpp does (e.g.
Q4_K -> Q5_0, then F16) -- unless the type was asked for explicitly, which is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .blocks import BlockType, by_name
from .errors import QConvertError
from .methods.mixes import Mix, fallback, mix_type, model_shape, output_type
from .sources.base import SourceTensor


@dataclass
class ConvertResult:
    """What a conversion wrote: the output path, every tensor's plan, the time, the provenance."""

    output: Path
    plans: list["TensorPlan"]
    seconds: float  # wall time of the whole call: calibration and importance matrix included
    source: dict[str, Any]
    warnings: list[str] = field(default_factory=list)  # things the user should know (no tokenizer ...)

    def __repr__(self) -> str:
        return f"ConvertResult(output={str(self.output)!r}, tensors={len(self.plans)}, seconds={self.seconds:.1f})"


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    source_type: str
    type_name: str
    reason: str  # why this type: "default", "mix", "float-only", "output", "--keep", "--tensor-type", "fallback ..."

    @property
    def copies_source(self) -> bool:
        """Stored as the source's own bytes (no re-quantization)."""
        return self.type_name == self.source_type


def parse_tensor_types(items: list[str]) -> list[tuple[re.Pattern, BlockType]]:
    out = []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern:
            raise QConvertError(f"--tensor-type takes REGEX=TYPE (e.g. 'down_proj=q8_0'), got {item!r}")
        out.append((_compile(pattern, "--tensor-type"), by_name(type_name)))
    return out


def _compile(pattern: str, option: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QConvertError(f"{option}: invalid regular expression {pattern!r} ({e})") from None


def plan_tensors(
    tensors: list[SourceTensor],
    arch,
    config: dict,
    mix: Mix,
    keep: str | None = None,
    tensor_types: list[str] | None = None,
    has_imatrix: bool = False,
) -> list[TensorPlan]:
    """One plan per tensor; ``arch`` (``qconvert.arch.Arch``) says each tensor's role."""
    keep_re = _compile(keep, "--keep") if keep else None
    overrides = parse_tensor_types(tensor_types or [])
    output_name = arch.output_name([t.name for t in tensors], config)
    cfg = arch.parse_config(config)
    n_heads = getattr(cfg, "n_heads", 1)
    shape = model_shape(getattr(cfg, "n_layers", 0), n_heads, getattr(cfg, "n_kv_heads", n_heads), getattr(cfg, "n_experts", 0))
    plans = []
    for t in tensors:
        plans.append(_plan_one(t, arch, mix, shape, keep_re, overrides, t.name == output_name, has_imatrix))
    return plans


def _plan_one(t, arch, mix, shape, keep_re, overrides, is_output, has_imatrix) -> TensorPlan:
    def make(type_name: str, reason: str) -> TensorPlan:
        return TensorPlan(t.name, t.shape, t.dtype, type_name, reason)

    source_is_float = by_name(t.dtype).is_float
    kept_type = t.dtype if len(t.shape) > 1 or not source_is_float else "F32"
    for pattern, block_type in overrides:
        if pattern.search(t.name):
            if not block_type.can_hold(t.shape):
                raise QConvertError(
                    f"--tensor-type {pattern.pattern}={block_type.name}: tensor {t.name} has rows of"
                    f" {t.shape[-1]} values, not a multiple of {block_type.name}'s block of {block_type.block_size}"
                )
            return make(block_type.name, "--tensor-type")
    if keep_re is not None and keep_re.search(t.name):
        return make(kept_type, "--keep")
    if len(t.shape) < 2 or arch.is_float_only(t.name):
        return make(kept_type, "float-only")
    if is_output:
        target, reason = output_type(mix, t.shape[-1]), "output"
    else:
        entry = arch.entry(t.name)
        role, layer = (entry[0].role, entry[1].get("i")) if entry else ("other", None)
        target = mix_type(mix, role, layer, shape, has_imatrix)
        reason = "default" if target == mix.default else "mix"
    final, why = fallback(target, t.shape[-1])
    return make(final, why or reason)
