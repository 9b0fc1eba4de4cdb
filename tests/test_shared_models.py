"""Conversions of the real models in ../shared (skipped with a reason when it is absent)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import qconvert
from tests.conftest import SMOLLM_GGUF, STORIES, need_shared

pytestmark = pytest.mark.shared


def _safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: tuple(v["shape"]) for k, v in header.items()}


def test_stories260k_rtn8_lists_every_tensor_with_shapes_and_types(tmp_path):
    folder = need_shared(STORIES)
    out = tmp_path / "s.q8"
    qconvert.quantize(folder, out, method="rtn", bits=8)
    shapes = _safetensors_shapes(folder / "model.safetensors")
    with qconvert.load(out) as c:
        assert {n: i.shape for n, i in c.tensors.items()} == shapes
        for name, info in c.tensors.items():
            if len(info.shape) == 1:
                expected = "F32"
            elif info.shape[-1] % 32:
                expected = "F16"  # down_proj rows of 172: fallback
            else:
                expected = "Q8_0"
            assert info.block_type.name == expected, name
        assert c.source["files"][1]["sha256"] == "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
        assert "tokenizer.json" in c.metadata
        # Q8_0 is close to the source: relative RMS error well under 1%
        from safetensors.numpy import load_file

        src = load_file(str(folder / "model.safetensors"))
        w = src["model.layers.2.mlp.up_proj.weight"]
        err = np.sqrt(np.mean((c.tensor("model.layers.2.mlp.up_proj.weight") - w) ** 2) / np.mean(w**2))
        assert err < 0.01


def test_smollm2_gguf_requantized_to_q8_0_stays_close_to_its_q4_1_values(tmp_path):
    gguf_path = need_shared(SMOLLM_GGUF)
    out = tmp_path / "smol.q8"
    qconvert.quantize(gguf_path, out, method="rtn", bits=8, keep="embed_tokens", allow_requantize=True)
    from qconvert.sources.gguf import open_gguf

    with open_gguf(gguf_path) as src, qconvert.load(out) as c:
        assert c.source["quantized"] is True
        assert c.config["num_hidden_layers"] == 30 and c.config["tie_word_embeddings"] is True
        assert "tokenizer.gguf" in c.metadata
        by_name = {t.name: t for t in src.tensors}
        # --keep copies the source's Q8_0 embedding bytes unchanged
        assert c.tensors["model.embed_tokens.weight"].block_type.name == by_name["model.embed_tokens.weight"].dtype
        assert np.array_equal(c.raw("model.embed_tokens.weight").reshape(-1), by_name["model.embed_tokens.weight"].load_raw().reshape(-1))
        w = by_name["model.layers.3.self_attn.q_proj.weight"].load()
        got = c.tensor("model.layers.3.self_attn.q_proj.weight")
        assert np.sqrt(np.mean((got - w) ** 2) / np.mean(w**2)) < 0.01
