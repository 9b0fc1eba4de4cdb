"""Architectures: one file per family, one line per architecture in :data:`ARCHITECTURES`.

Everything qconvert knows about a model family -- config validation, tensor names (Hugging
Face <-> GGUF), tensor roles, which linears share an input, the block's forward -- lives in its
file here; the sources, the plan, the methods, the runtime and the exporters ask this registry.
"""

from __future__ import annotations

from ..errors import QConvertError
from .base import Arch, Context, InputGroup, KVCache, Layer, T

from . import bert, gpt2  # noqa: E402
from .gemma import GEMMA2, GEMMA3  # noqa: E402
from .llama import LLAMA, QWEN2  # noqa: E402
from .moe import MIXTRAL, QWEN3_MOE  # noqa: E402
from .phi3 import PHI3  # noqa: E402
from .qwen3 import QWEN3  # noqa: E402

ARCHITECTURES: tuple[Arch, ...] = (
    LLAMA,
    QWEN2,
    QWEN3,
    GEMMA2,
    GEMMA3,
    PHI3,
    MIXTRAL,
    QWEN3_MOE,
    gpt2.ARCH,
    bert.ARCH,
)

__all__ = ["ARCHITECTURES", "Arch", "Context", "InputGroup", "KVCache", "Layer", "T", "by_gguf", "by_model_type",
           "by_name", "gguf_name_for_hf", "hf_name_for_gguf", "supported_gguf_architectures", "supported_model_types"]


def by_name(name: str) -> Arch:
    """The architecture a container's ``model.architecture`` names."""
    for a in ARCHITECTURES:
        if a.name == name:
            return a
    raise QConvertError(f"unknown architecture {name!r}; supported: {', '.join(a.name for a in ARCHITECTURES)}")


def by_model_type(model_type: str) -> Arch:
    """The architecture for a Hugging Face config.json ``model_type``."""
    for a in ARCHITECTURES:
        if model_type in a.model_types:
            return a
    raise QConvertError(
        f"unknown architecture {model_type or '(no model_type in config.json)'!r}; supported: {', '.join(supported_model_types())}"
    )


def by_gguf(gguf_arch: str, kv: dict | None = None) -> Arch:
    """The architecture for a GGUF ``general.architecture`` (and, given the file's metadata
    ``kv``, the family whose ``gguf_match`` accepts it before the plain one: a "llama" file with
    experts is Mixtral)."""
    found = [a for a in ARCHITECTURES
             if a.kind == "decoder" and (gguf_arch == a.gguf_arch or gguf_arch in a.gguf_archs_read)]
    for a in found:
        if a.gguf_match is not None and kv is not None and a.gguf_match(kv):
            return a
    for a in found:
        if a.gguf_match is None:
            return a
    raise QConvertError(
        f"GGUF architecture {gguf_arch!r} is not supported yet (supported: {', '.join(supported_gguf_architectures())})"
    )


def supported_model_types() -> list[str]:
    return sorted({t for a in ARCHITECTURES for t in a.model_types})


def supported_gguf_architectures() -> list[str]:
    return sorted({g for a in ARCHITECTURES if a.kind == "decoder" for g in (a.gguf_arch, *a.gguf_archs_read)})


def hf_name_for_gguf(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, by the first decoder family that has it
    (families agree on the tensors they share); None when none has it or it names several."""
    for a in ARCHITECTURES:
        if a.kind == "decoder":
            names = a.hf_names(gguf_name)
            if names is not None:
                return names[0] if len(names) == 1 else None
    return None


def gguf_name_for_hf(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name (first decoder family that has it)."""
    for a in ARCHITECTURES:
        if a.kind == "decoder" and a.entry(hf_name) is not None:
            return a.gguf_name(hf_name)[0]
    raise QConvertError(f"tensor {hf_name!r} has no llama.cpp name")
