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
from dataclasses import dataclass

from .blocks import BlockType, by_name
from .errors import QConvertError
from .methods.mixes import Mix, fallback, mix_type, model_shape, output_type
from .sources.base import SourceTensor

# Never quantized (llama.cpp keeps these in float too).
_FLOAT_ONLY = re.compile(
    r"(norm|ln_\d|ln_f|LayerNorm|\.bias$|position_embeddings|token_type_embeddings|\bwpe\b|rotary|inv_freq)"
)
_OUTPUT_NAMES = ("lm_head.weight",)
_TIED_EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight")


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


def output_tensor_name(names: list[str], config: dict) -> str | None:
    """The tensor that projects hidden states to logits: lm_head, or the tied embedding."""
    for n in _OUTPUT_NAMES:
        if n in names:
            return n
    if config.get("tie_word_embeddings", True):
        for n in _TIED_EMBEDDING_NAMES:
            if n in names:
                return n
    return None


def plan_tensors(
    tensors: list[SourceTensor],
    config: dict,
    mix: Mix,
    keep: str | None = None,
    tensor_types: list[str] | None = None,
    has_imatrix: bool = False,
) -> list[TensorPlan]:
    keep_re = _compile(keep, "--keep") if keep else None
    overrides = parse_tensor_types(tensor_types or [])
    output_name = output_tensor_name([t.name for t in tensors], config)
    shape = model_shape(config)
    plans = []
    for t in tensors:
        plans.append(_plan_one(t, mix, shape, keep_re, overrides, t.name == output_name, has_imatrix))
    return plans


def _plan_one(t, mix, shape, keep_re, overrides, is_output, has_imatrix) -> TensorPlan:
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
    if len(t.shape) < 2 or _FLOAT_ONLY.search(t.name):
        return make(kept_type, "float-only")
    if is_output:
        target, reason = output_type(mix, t.shape[-1]), "output"
    else:
        target = mix_type(mix, t.name, shape, has_imatrix)
        reason = "default" if target == mix.default else "mix"
    final, why = fallback(target, t.shape[-1])
    return make(final, why or reason)
