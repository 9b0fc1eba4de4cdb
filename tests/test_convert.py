"""The conversion pipeline on tiny checkpoints built on the fly (runs anywhere)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from tests.conftest import make_hf_folder, tiny_llama_tensors, write_safetensors


def test_rtn8_quantizes_matrices_and_keeps_norms_in_float(tiny_hf, tmp_path):
    out = tmp_path / "m.q8"
    qconvert.quantize(tiny_hf, out, method="rtn", bits=8)
    src = tiny_llama_tensors()
    with qconvert.load(out) as c:
        assert set(c.tensors) == set(src)
        for name, values in src.items():
            info = c.tensors[name]
            assert info.shape == values.shape
            expected = "F32" if values.ndim == 1 else "Q8_0"
            assert info.block_type.name == expected, name
            got = c.tensor(name)
            if values.ndim == 1:
                np.testing.assert_array_equal(got, values)
            else:
                # Q8_0: half a step of the block scale d = amax/127, plus fp16 rounding of d (<= 127 * 2^-11 steps)
                step = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                assert (np.abs(got - values).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
        assert c.architecture == "llama"
        assert c.config["num_hidden_layers"] == 2
        assert c.recipe["method"] == "rtn" and c.recipe["bits"] == 8
        assert c.source["kind"] == "hf" and c.source["quantized"] is False
        assert {f["name"] for f in c.source["files"]} == {"model.safetensors", "config.json"}
        assert all(len(f["sha256"]) == 64 for f in c.source["files"])


def test_low_bits_keep_the_tied_output_embedding_at_8_bits(tiny_hf, tmp_path):
    out = tmp_path / "m.q4"
    qconvert.quantize(tiny_hf, out, method="rtn", bits=4, sym=False)
    with qconvert.load(out) as c:
        assert c.tensors["model.embed_tokens.weight"].block_type.name == "Q8_0"
        assert c.tensors["model.layers.0.mlp.up_proj.weight"].block_type.name == "Q4_1"


def test_untied_lm_head_is_the_output_tensor(tmp_path):
    folder = make_hf_folder(tmp_path / "untied", tied=False)
    qconvert.quantize(folder, tmp_path / "m.q", bits=5)
    with qconvert.load(tmp_path / "m.q") as c:
        assert c.tensors["lm_head.weight"].block_type.name == "Q8_0"
        assert c.tensors["model.embed_tokens.weight"].block_type.name == "Q5_0"


def test_same_inputs_give_byte_identical_files(tiny_hf, tmp_path):
    qconvert.quantize(tiny_hf, tmp_path / "a.q", bits=4)
    qconvert.quantize(tiny_hf, tmp_path / "b.q", bits=4)
    assert (tmp_path / "a.q").read_bytes() == (tmp_path / "b.q").read_bytes()


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_sources(tmp_path, dtype):
    folder = make_hf_folder(tmp_path / dtype, dtype=dtype)
    qconvert.quantize(folder, tmp_path / "m.q", bits=8, keep="embed")
    src = tiny_llama_tensors()
    with qconvert.load(tmp_path / "m.q") as c:
        # --keep stores the source's own bytes: exactly the half-precision values
        assert c.tensors["model.embed_tokens.weight"].block_type.name == dtype
        emb = c.tensor("model.embed_tokens.weight")
        tol = 2**-8 if dtype == "F16" else 2**-7
        np.testing.assert_allclose(emb, src["model.embed_tokens.weight"], rtol=tol, atol=1e-6)
        assert c.source["source_types"] == {dtype: len(src)}
        assert c.tensors["model.norm.weight"].block_type.name == "F32"


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single = make_hf_folder(tmp_path / "single")
    sharded = make_hf_folder(tmp_path / "sharded", shards=3)
    qconvert.quantize(single, tmp_path / "a.q", bits=4)
    qconvert.quantize(sharded, tmp_path / "b.q", bits=4)
    with qconvert.load(tmp_path / "a.q") as a, qconvert.load(tmp_path / "b.q") as b:
        assert list(a.tensors) == list(b.tensors)
        for name in a.tensors:
            assert np.array_equal(a.raw(name), b.raw(name)), name
        assert len(b.source["files"]) == 4  # 3 shards + config.json


def test_keep_and_tensor_type_overrides(tiny_hf, tmp_path):
    qconvert.quantize(tiny_hf, tmp_path / "m.q", bits=4, keep="q_proj", tensor_types=["down_proj=q8_0", "up_proj=Q5_1"])
    with qconvert.load(tmp_path / "m.q") as c:
        types = {n: i.block_type.name for n, i in c.tensors.items()}
    assert types["model.layers.1.self_attn.q_proj.weight"] == "F32"
    assert types["model.layers.1.mlp.down_proj.weight"] == "Q8_0"
    assert types["model.layers.0.mlp.up_proj.weight"] == "Q5_1"
    assert types["model.layers.0.mlp.gate_proj.weight"] == "Q4_0"


def test_row_length_the_type_cannot_hold_falls_back_to_f16(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["model.layers.0.mlp.extra.weight"] = np.ones((4, 40), np.float32)
    folder = make_hf_folder(tmp_path / "odd", tensors=tensors)
    result = qconvert.quantize(folder, tmp_path / "m.q", bits=8)
    plan = {p.name: p for p in result.plans}["model.layers.0.mlp.extra.weight"]
    assert plan.type_name == "F16" and "not a multiple of Q8_0's block of 32" in plan.reason


def test_explicit_type_the_row_cannot_hold_is_an_error(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["model.layers.0.mlp.extra.weight"] = np.ones((4, 40), np.float32)
    folder = make_hf_folder(tmp_path / "odd", tensors=tensors)
    with pytest.raises(QConvertError, match="rows of 40 values, not a multiple of Q4_0's block of 32"):
        qconvert.quantize(folder, tmp_path / "m.q", tensor_types=["extra=q4_0"])
    assert not (tmp_path / "m.q").exists()


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = np.nan
    folder = make_hf_folder(tmp_path / "nan", tensors=tensors)
    with pytest.raises(QConvertError, match=r"model.layers.1.mlp.up_proj.weight has 1 NaN or infinite"):
        qconvert.quantize(folder, tmp_path / "m.q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 6}, "supports --bits 2, 3, 4, 8, not 6"),
        ({"bits": 8, "sym": False}, "symmetric only"),
        ({"group": 48}, "--group must be one of 128, 64, 32"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"tensor_types": ["down_proj"]}, "REGEX=TYPE"),
        ({"tensor_types": ["down_proj=q9_9"]}, "unknown block type 'q9_9'"),
        ({"keep": "("}, "invalid regular expression"),
        ({"method": "q4_k_m", "mse": True}, "--mse applies to gptq and to group-wise rtn"),
        ({"bits": 4, "mse": True}, "--mse applies to gptq and to group-wise rtn"),  # rtn 4-bit = Q4_0 blocks
    ],
)
def test_wrong_options_are_clear_errors(tiny_hf, tmp_path, kwargs, message):
    with pytest.raises(QConvertError, match=message):
        qconvert.quantize(tiny_hf, tmp_path / "m.q", **kwargs)


def test_missing_config_json(tiny_hf, tmp_path):
    (tiny_hf / "config.json").unlink()
    with pytest.raises(QConvertError, match="no config.json"):
        qconvert.quantize(tiny_hf, tmp_path / "m.q")


def test_unknown_architecture(tiny_hf, tmp_path):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    cfg["model_type"] = "mamba9000"
    (tiny_hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QConvertError, match="unknown architecture 'mamba9000'; supported: bert, .*gpt2, .*llama"):
        qconvert.quantize(tiny_hf, tmp_path / "m.q")


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # a payload that would run code if unpickled
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(QConvertError, match="only pickle checkpoints .*never unpickles"):
        qconvert.quantize(folder, tmp_path / "m.q")


@pytest.mark.parametrize("cut", [4, 20, -10])
def test_truncated_safetensors(tiny_hf, tmp_path, cut):
    f = tiny_hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(QConvertError, match="truncated"):
        qconvert.quantize(tiny_hf, tmp_path / "m.q")


def test_safetensors_with_garbage_header(tiny_hf, tmp_path):
    write_safetensors(tiny_hf / "model.safetensors", {})
    data = bytearray((tiny_hf / "model.safetensors").read_bytes())
    data[8:10] = b"\xff\xfe"
    (tiny_hf / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(QConvertError, match="header is not a JSON object"):
        qconvert.quantize(tiny_hf, tmp_path / "m.q")


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(QConvertError, match="could not get nobody/no-such-model"):
        qconvert.quantize("nobody/no-such-model", tmp_path / "m.q")


def test_hub_id_served_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's normal cache layout (offline)."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / "0123abcd"
    make_hf_folder(snap)
    (cache / "models--someone--tiny" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    qconvert.quantize("someone/tiny", tmp_path / "m.q")
    with qconvert.load(tmp_path / "m.q") as c2:
        assert c2.source["id"] == "someone/tiny" and c2.source["commit"] == "0123abcd"


def test_groupwise_rtn_with_mse_range_search(tiny_hf, tmp_path):
    from qconvert.blocks.grid import dequantize_groupwise, group_index, rtn_groupwise

    out = tmp_path / "m.q"
    qconvert.quantize(tiny_hf, out, method="rtn", bits=3, group=32, sym=False, mse=True)
    name = "model.layers.0.mlp.up_proj.weight"
    W = tiny_llama_tensors(seed=0, tied=True)[name]
    with qconvert.load(out) as c:
        assert c.recipe["mse"] is True and c.info(name).block_type.name == "I3G32"
        q, s, z = rtn_groupwise(W, 3, 32, False, mse=True)
        np.testing.assert_array_equal(c.tensor(name), dequantize_groupwise(q, s, z, group_index(W.shape[1], 32)))
        q0, s0, z0 = rtn_groupwise(W, 3, 32, False)
        assert not np.array_equal(s, s0)  # the search moved some ranges
