"""What ``qconvert inspect`` shows, as plain data (the CLI renders it or prints it as JSON)."""

from __future__ import annotations

from typing import Any

from .container import Container

_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
)


def _abbreviate(params: dict) -> dict:
    """Long lists (absmax tables, permutations) shown by their length, not their values."""
    return {k: (f"<{len(v)} values>" if isinstance(v, list) and len(v) > 8 else v) for k, v in params.items()}


def summarize(c: Container, verify: bool = False) -> dict[str, Any]:
    tensors = []
    n_params = n_bytes = 0
    types: dict[str, int] = {}
    for info in c.tensors.values():
        try:
            type_name = info.block_type.name
        except Exception:  # a block type from a newer version: still listed
            type_name = f"unknown({info.type_id})"
        n = info.n_elements
        # side data in the tensor's params (NF4_DQ's double-quant state) counts as the tensor's bits
        side_bits = 0
        try:
            bt = info.block_type
            if bt.params_bits is not None and info.extra:
                side_bits = bt.params_bits(info.extra)
        except Exception:
            pass
        tensors.append(
            {
                "name": info.name,
                "shape": list(info.shape),
                "type": type_name,
                "bytes": info.nbytes,
                "bits_per_weight": round((8 * info.nbytes + side_bits) / n, 4) if n else 0.0,
                **({"params": _abbreviate(info.extra)} if info.extra else {}),
            }
        )
        n_params += n
        n_bytes += info.nbytes + side_bits / 8
        types[type_name] = types.get(type_name, 0) + 1
    source = c.source
    source_bytes = source.get("tensor_bytes")
    cfg = c.config
    out: dict[str, Any] = {
        "path": str(c.path),
        "file_bytes": c.file_size,
        "format_version": f"{c.major}.{c.minor}",
        "alignment": c.alignment,
        "qconvert_version": c.metadata.get("qconvert.version"),
        "architecture": c.architecture,
        "config": {k: cfg[k] for k in _CONFIG_KEYS if k in cfg},
        "has_tokenizer": "tokenizer.json" in c.metadata or "tokenizer.gguf" in c.metadata,
        "source": {k: v for k, v in source.items() if k != "general"},
        "source_quantization": describe_source_quantization(source),
        "recipe": c.recipe,
        "metadata_keys": sorted(c.metadata),
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "parameters": n_params,
            "tensor_bytes": int(round(n_bytes)),
            "bits_per_weight": round(8 * n_bytes / n_params, 4) if n_params else 0.0,
            "source_tensor_bytes": source_bytes,
            "compression_ratio": round(source_bytes / n_bytes, 4) if source_bytes and n_bytes else None,
            # tensor bytes include params side data (NF4_DQ's double-quant state)
            "types": dict(sorted(types.items())),
        },
    }
    if verify:
        out["corrupt_tensors"] = c.verify()
    return out


def describe_source_quantization(source: dict[str, Any]) -> str:
    """The source's quantization in words: what the input held before qconvert touched it."""
    types = source.get("source_types") or {}
    counts = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
    if not source.get("quantized"):
        return "unquantized (float weights" + (f": {counts} tensors)" if counts else ")")
    q = source.get("quantization")
    if isinstance(q, dict) and q.get("from"):  # a GPTQ / AWQ checkpoint
        words = f"already quantized: a {str(q['from']).upper()} checkpoint, {q.get('bits')}-bit weights in groups of {q.get('group')}"
        words += ", symmetric" if q.get("sym") else ", with zero points"
        return words + (", act-order" if q.get("desc_act") else "")
    from .methods.mixes import MIXES

    ftype = source.get("file_type")
    mix = next((m.name.upper() for m in MIXES.values() if m.ftype == ftype), None) if isinstance(ftype, int) else None
    return "already quantized" + (f" ({mix})" if mix else "") + (f": {counts} tensors" if counts else "")
