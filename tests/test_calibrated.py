"""GPTQ and AWQ end to end on stories260K: calibration, storage, runtime, and quality vs RTN."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qconvert
from qconvert.evaluate import evaluate, read_text
from qconvert.methods import awq as awq_core
from qconvert.runtime.models import load_model
from qconvert.runtime.tokenizer import Tokenizer
from tests.conftest import SHARED, STORIES, need_shared, write_safetensors

pytestmark = pytest.mark.shared
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
OPTS = dict(calib=CALIB, calib_samples=16, calib_seqlen=256, seed=0)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    need_shared(STORIES)
    need_shared(CALIB)
    d = tmp_path_factory.mktemp("calibrated")
    qconvert.quantize(STORIES, d / "f32", method="f32")
    for bits in (3, 4):
        qconvert.quantize(STORIES, d / f"rtn{bits}", method="rtn", bits=bits, group=128, sym=False)
        qconvert.quantize(STORIES, d / f"gptq{bits}", method="gptq", bits=bits, group=128, sym=False, **OPTS)
    qconvert.quantize(STORIES, d / "gptq3mse", method="gptq", bits=3, group=128, sym=False, mse=True, **OPTS)
    qconvert.quantize(STORIES, d / "awq4", method="awq", bits=4, group=128, **OPTS)
    qconvert.quantize(STORIES, d / "gptq4ao", method="gptq", bits=4, group=32, act_order=True, **OPTS)
    return d


def _kld(d, name: str) -> float:
    with qconvert.load(d / "f32") as ref_c, qconvert.load(d / name) as c:
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(need_shared(WIKI))[:30000], add_bos=False)
        r = evaluate(load_model(c), tokens, ctx=256, chunks=8, bos_id=tok.bos_id, reference=load_model(ref_c))
    return r.reference["kld_mean"]


def test_gptq_and_awq_beat_rtn_at_w4_g128_and_gptq_wins_big_at_w3(made):
    kld = {n: _kld(made, n) for n in ("rtn4", "gptq4", "awq4", "rtn3", "gptq3")}
    assert kld["gptq4"] < kld["rtn4"], kld
    assert kld["awq4"] < kld["rtn4"], kld
    with qconvert.load(made / "awq4") as c:  # 16 windows of 256: all 4096 tokens fit the search budget
        assert c.recipe["search_tokens"] == 4096
    assert kld["gptq3"] < 0.7 * kld["rtn3"], kld


def test_gptq_with_mse_range_search(made):
    """--mse: recorded in the recipe, and at 3 bits still far below RTN's KLD."""
    with qconvert.load(made / "gptq3mse") as c, qconvert.load(made / "gptq3") as plain:
        assert c.recipe["mse"] is True and plain.recipe["mse"] is False
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not np.array_equal(c.raw(name), plain.raw(name))
    assert _kld(made, "gptq3mse") < 0.7 * _kld(made, "rtn3")


def test_groups_that_do_not_divide_the_rows_fall_back_and_are_recorded(made):
    with qconvert.load(made / "gptq4") as c:
        # stories260K: hidden 64 -> groups of 64; FFN 172 divides by no group -> stays F16
        assert c.tensors["model.layers.0.self_attn.q_proj.weight"].block_type.name == "I4G64"
        assert c.tensors["model.layers.0.mlp.down_proj.weight"].block_type.name == "F16"
        assert c.tensors["model.embed_tokens.weight"].block_type.name == "Q8_0"
        calib = c.recipe["calibration"]
        assert calib["samples"] == 16 and calib["seqlen"] == 256 and calib["seed"] == 0
        assert len(calib["text_sha256"]) == 64 and calib["source"] == "input.txt"
        assert c.recipe["method"] == "gptq" and c.recipe["damp"] == 0.01


def test_act_order_container_stores_a_permutation_the_runtime_applies(made):
    with qconvert.load(made / "gptq4ao") as c:
        name = "model.layers.1.mlp.gate_proj.weight"
        info = c.tensors[name]
        perm = np.array(info.extra["input_perm"])
        assert sorted(perm.tolist()) == list(range(64)) and not np.array_equal(perm, np.arange(64))
        stored = c.tensor(name)
        original = np.empty_like(stored)
        original[:, perm] = stored
        x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
        lin = load_model(c).layers[1].linear("mlp.gate_proj.weight")
        np.testing.assert_allclose(lin(x), x @ original.T, rtol=1e-5, atol=1e-5)
    assert _kld(made, "gptq4ao") < _kld(made, "rtn4")


def test_gptq_is_deterministic(made, tmp_path):
    qconvert.quantize(STORIES, tmp_path / "again", method="gptq", bits=4, group=128, sym=False, **OPTS)
    assert (tmp_path / "again").read_bytes() == (made / "gptq4").read_bytes()


def test_awq_scale_folding_is_exact_in_float(tmp_path):
    """Folding scales into the norms and the next linears leaves the float model's logits alone."""
    need_shared(STORIES)
    from safetensors.numpy import load_file

    w = load_file(str(STORIES / "model.safetensors"))
    rng = np.random.default_rng(0)
    folded = dict(w)
    for i in range(5):
        p = f"model.layers.{i}."
        s = np.exp(rng.normal(0, 0.5, 64)).astype(np.float32)
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        norm, _, ws = awq_core.fold_into_norm(w[p + "input_layernorm.weight"], None, [w[n] for n in qkv], s)
        folded[p + "input_layernorm.weight"] = norm
        folded.update(dict(zip(qkv, ws)))
        s = np.exp(rng.normal(0, 0.5, 64)).astype(np.float32)
        gu = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        norm, _, ws = awq_core.fold_into_norm(w[p + "post_attention_layernorm.weight"], None, [w[n] for n in gu], s)
        folded[p + "post_attention_layernorm.weight"] = norm
        folded.update(dict(zip(gu, ws)))
        s = np.exp(rng.normal(0, 0.5, 172)).astype(np.float32)
        up, _, (down,) = awq_core.fold_into_linear(folded[p + "mlp.up_proj.weight"], None,
                                                   [w[p + "mlp.down_proj.weight"]], s)
        folded[p + "mlp.up_proj.weight"], folded[p + "mlp.down_proj.weight"] = up, down
    target = tmp_path / "folded"
    shutil.copytree(STORIES, target, ignore=shutil.ignore_patterns("original"))
    write_safetensors(target / "model.safetensors",
                      {n: ("F32", v.shape, np.ascontiguousarray(v, np.float32).tobytes()) for n, v in folded.items()})
    qconvert.quantize(target, tmp_path / "folded.q", method="f32")
    qconvert.quantize(STORIES, tmp_path / "orig.q", method="f32")
    ids = np.array([1, 403, 407, 261, 378, 432, 383, 286, 261, 376])
    with qconvert.load(tmp_path / "orig.q") as a, qconvert.load(tmp_path / "folded.q") as b:
        ma, mb = load_model(a), load_model(b)
        la, lb = ma.forward(ids, ma.new_cache(16)), mb.forward(ids, mb.new_cache(16))
    assert np.abs(la - lb).max() <= 1e-4


def test_cli_gptq_json(tmp_path):
    from tests.test_cli import qconvert as cli

    need_shared(STORIES)
    proc = cli("quantize", STORIES, "--method", "gptq", "--bits", "4", "--calib", need_shared(CALIB),
               "--calib-samples", "4", "--calib-seqlen", "64", "-o", tmp_path / "g.q", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["types"] == {"F16": 5, "F32": 11, "I4G64": 30, "Q8_0": 1}
