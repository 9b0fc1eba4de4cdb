"""Phi-3 and mixture-of-experts cases beyond ``test_architectures.py``'s grid: which family
reads a GGUF, llama.cpp-converter keys, what GGUF export refuses, MoE configurations llama.cpp
cannot express (still run exactly as transformers), expert order in merged GGUF tensors."""

from __future__ import annotations

import numpy as np
import pytest

import qconvert
from qconvert.arch import by_gguf, by_model_type
from qconvert.errors import QConvertError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qconvert.runtime.models import load_model  # noqa: E402

from .test_architectures import ARCHS, _prompt, _tokenizer_json, make_model  # noqa: E402


def _kv(arch: str, **extra) -> dict:
    base = {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
            "attention.head_count": 4, "attention.head_count_kv": 4, "attention.layer_norm_rms_epsilon": 1e-5,
            "rope.dimension_count": 16, **extra}
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in base.items()}}


def test_a_llama_gguf_with_experts_is_mixtral():
    assert by_gguf("llama", _kv("llama", expert_count=8, expert_used_count=2)).name == "mixtral"
    assert by_gguf("llama", _kv("llama")).name == "llama"
    assert by_gguf("llama", _kv("llama", expert_count=0)).name == "llama"
    assert by_gguf("llama").name == "llama"
    assert by_gguf("qwen3moe").name == "qwen3_moe" and by_gguf("phi3").name == "phi3"


def test_phi3_gguf_keys_as_convert_hf_to_gguf_writes_them():
    arch = by_gguf("phi3")
    shapes = {"token_embd.weight": (320, 64)}
    # Phi-4: sliding_window 0 means none; rope.dimension_count 12 of 16 is partial_rotary_factor 0.75
    config = arch.config_from_gguf(_kv("phi3", **{"attention.sliding_window": 0, "rope.dimension_count": 12}),
                                   shapes, "phi3")
    cfg = arch.parse_config(config)
    assert cfg.windows == (None, None) and cfg.rope_dim == 12 and config["partial_rotary_factor"] == 0.75
    with pytest.raises(QConvertError, match="LongRoPE"):
        arch.config_from_gguf(_kv("phi3"), {**shapes, "rope_factors_long.weight": (8,)}, "phi3")


@pytest.mark.parametrize("scaling", [{"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
                                     {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}])
def test_phi3_longrope_is_refused_clearly(scaling):
    config = {"model_type": "phi3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "rope_scaling": scaling}
    with pytest.raises(QConvertError, match="LongRoPE"):
        by_model_type("phi3").parse_config(config)


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return _tokenizer_json()


def _variant(monkeypatch, name: str, base: str, **extra) -> str:
    cfg_cls, model_cls, kwargs, arch, gguf_arch = ARCHS[base]
    monkeypatch.setitem(ARCHS, name, (cfg_cls, model_cls, {**kwargs, **extra}, arch, gguf_arch))
    return name


def _f32_matches_transformers(tmp_path, name, tokenizer_json):
    hf = make_model(name, tmp_path / "hf", tokenizer_json)
    qconvert.quantize(tmp_path / "hf", tmp_path / "f32.q", method="f32")
    ids = _prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    with qconvert.load(tmp_path / "f32.q") as c:
        model = load_model(c)
        assert np.abs(model.forward(np.array(ids), model.new_cache(64)) - ref).max() <= 1e-4


@pytest.mark.parametrize("extra,refusal", [
    (dict(norm_topk_prob=False), "norm_topk_prob"),  # llama.cpp's qwen3moe always renormalises
    (dict(mlp_only_layers=[0]), "no llama.cpp name"),  # qwen3moe has experts in every layer
    (dict(decoder_sparse_step=2), "no llama.cpp name"),
])
def test_qwen3_moe_variants_run_but_gguf_refuses(tmp_path, monkeypatch, tokenizer_json, extra, refusal):
    from qconvert.export.gguf import export_gguf

    name = _variant(monkeypatch, "qwen3_moe-variant", "qwen3_moe", **extra)
    _f32_matches_transformers(tmp_path, name, tokenizer_json)
    with qconvert.load(tmp_path / "f32.q") as c, pytest.raises(QConvertError, match=refusal):
        export_gguf(c, tmp_path / "m.gguf")


def test_more_than_ten_experts_keep_their_order_in_gguf(tmp_path, monkeypatch, tokenizer_json):
    """Experts 0..11 in one merged tensor, in index order (not "10" < "2"), and back."""
    gguf = pytest.importorskip("gguf")
    from qconvert.export.gguf import export_gguf
    from qconvert.sources import open_source

    name = _variant(monkeypatch, "mixtral-12", "mixtral", num_local_experts=12, num_experts_per_tok=3)
    _f32_matches_transformers(tmp_path, name, tokenizer_json)
    with qconvert.load(tmp_path / "f32.q") as c:
        export_gguf(c, tmp_path / "m.gguf")
        merged = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["blk.1.ffn_down_exps.weight"]
        data = np.asarray(merged.data).reshape(12, 64, 128)
        for e in range(12):
            np.testing.assert_array_equal(data[e], c.tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"))
        with open_source(str(tmp_path / "m.gguf")) as src:
            assert src.architecture == "mixtral" and src.config["num_local_experts"] == 12
            back = {t.name: t for t in src.tensors}
            np.testing.assert_array_equal(back["model.layers.0.block_sparse_moe.experts.11.w1.weight"].load(),
                                          c.tensor("model.layers.0.block_sparse_moe.experts.11.w1.weight"))


def test_llama_cpp_imatrix_names_follow_the_model_family(tmp_path):
    """llama.cpp's ``blk.N.ffn_up`` is Phi-3's gate_up_proj (Llama's up_proj): a llama.cpp
    imatrix is named by the family of the model it is applied to."""
    from qconvert.imatrix import load_imatrix

    from .test_imatrix_files import dat_bytes

    up, qkv = np.arange(1, 9, dtype=np.float32), np.arange(1, 5, dtype=np.float32)
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes([("blk.0.ffn_up.weight", 1, up), ("blk.0.attn_qkv.weight", 1, qkv)]))
    phi3, _ = load_imatrix(path, by_model_type("phi3"))
    assert set(phi3) == {"model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"}
    with pytest.raises(QConvertError, match="not a llama weight matrix"):
        load_imatrix(path, by_model_type("llama"))  # llama has no attn_qkv


def test_moe_imatrix_is_not_written_in_llama_cpp_formats(tmp_path):
    from qconvert.imatrix_files import DAT, write_llama_imatrix

    importance = {f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": np.ones(4, np.float32) for e in range(2)}
    with pytest.raises(QConvertError, match="mixture-of-experts"):
        write_llama_imatrix(tmp_path / "i.dat", importance, {"ctx": 8, "chunks": 1}, DAT)
