"""Shared fixtures: tiny checkpoints built on the fly, and the real material in ../shared."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOLLM_GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared/ folder beside the repo with real models and data); absent here")
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata=None) -> None:
    """Minimal safetensors writer that also handles BF16 (numpy has no bfloat16)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def to_bf16_bytes(x: np.ndarray) -> bytes:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def tiny_llama_tensors(seed: int = 0, hidden: int = 64, inter: int = 128, layers: int = 2, vocab: int = 96,
                       heads: int = 4, kv_heads: int = 2, tied: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, hidden)), "model.norm.weight": 1 + 0.1 * rng.normal(size=hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=hidden)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=hidden)
        t[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.1, (heads * hd, hidden))
        t[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.1, (kv_heads * hd, hidden))
        t[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.1, (kv_heads * hd, hidden))
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.1, (hidden, heads * hd))
        t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.1, (inter, hidden))
        t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.1, (inter, hidden))
        t[p + "mlp.down_proj.weight"] = rng.normal(0, 0.1, (hidden, inter))
    if not tied:
        t["lm_head.weight"] = rng.normal(0, 0.1, (vocab, hidden))
    return {k: v.astype(np.float32) for k, v in t.items()}


def tiny_llama_config(hidden=64, inter=128, layers=2, vocab=96, heads=4, kv_heads=2, tied=True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


def make_hf_folder(folder: Path, dtype: str = "F32", shards: int = 1, tied: bool = True, seed: int = 0,
                   tensors: dict[str, np.ndarray] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else tiny_llama_tensors(seed=seed, tied=tied)
    (folder / "config.json").write_text(json.dumps(tiny_llama_config(tied=tied)))

    def encode(x: np.ndarray) -> bytes:
        if dtype == "F32":
            return x.astype("<f4").tobytes()
        if dtype == "F16":
            return x.astype("<f2").tobytes()
        return to_bf16_bytes(x)

    names = list(tensors)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", {n: (dtype, tensors[n].shape, encode(tensors[n])) for n in names})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(folder / fname, {n: (dtype, tensors[n].shape, encode(tensors[n])) for n in part})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def tiny_hf(tmp_path: Path) -> Path:
    return make_hf_folder(tmp_path / "tiny-llama")
