"""Importance matrices: collected with our runtime, saved, loaded, recorded in the recipe."""

from __future__ import annotations

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.imatrix import collect_imatrix, load_imatrix, save_imatrix
from tests.conftest import SHARED, STORIES, make_hf_folder, need_shared

CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def stories_imatrix(tmp_path_factory):
    need_shared(STORIES)
    d = tmp_path_factory.mktemp("imatrix")
    qconvert.quantize(STORIES, d / "s.f32", method="f32")
    text = need_shared(CALIB).read_text()[:20_000]
    with qconvert.load(d / "s.f32") as c:
        importance, info = collect_imatrix(c, text, ctx=128, chunks=4)
    save_imatrix(d / "s.imatrix", importance, info)
    return d, importance, info


@pytest.mark.shared
def test_imatrix_has_one_vector_per_input_side_of_every_matrix(stories_imatrix):
    _, importance, info = stories_imatrix
    assert info["tokens"] == 4 * 128 and info["chunks"] == 4 and len(info["text_sha256"]) == 64
    # 5 layers x 7 matrices; the tied output projection (embed_tokens) is left out
    assert len(importance) == 35 and "model.embed_tokens.weight" not in importance
    assert importance["model.layers.0.mlp.down_proj.weight"].shape == (172,)
    assert importance["model.layers.0.self_attn.q_proj.weight"].shape == (64,)
    # q, k and v read the same normalised input; so do gate and up
    for i in range(5):
        p = f"model.layers.{i}."
        q = importance[p + "self_attn.q_proj.weight"]
        assert np.array_equal(q, importance[p + "self_attn.k_proj.weight"])
        assert np.array_equal(q, importance[p + "self_attn.v_proj.weight"])
        assert np.array_equal(importance[p + "mlp.gate_proj.weight"], importance[p + "mlp.up_proj.weight"])
    assert all((v > 0).all() and np.isfinite(v).all() for v in importance.values())


@pytest.mark.shared
def test_imatrix_file_round_trip_and_recipe(stories_imatrix, tmp_path):
    d, importance, info = stories_imatrix
    loaded, loaded_info = load_imatrix(d / "s.imatrix")
    assert loaded.keys() == importance.keys()
    assert all(np.array_equal(loaded[k], importance[k]) for k in importance)
    assert loaded_info["text_sha256"] == info["text_sha256"] and len(loaded_info["file_sha256"]) == 64
    qconvert.quantize(STORIES, tmp_path / "m.q4", bits=4, imatrix=d / "s.imatrix")
    with qconvert.load(tmp_path / "m.q4") as c:
        assert c.recipe["imatrix"]["text_sha256"] == info["text_sha256"]
        assert c.recipe["imatrix"]["tokens"] == 512


@pytest.mark.shared
def test_imatrix_of_another_model_is_refused(stories_imatrix, tmp_path):
    d, _, _ = stories_imatrix
    folder = make_hf_folder(tmp_path / "other", tensors={"model.other.weight": np.ones((4, 32), np.float32)})
    with pytest.raises(QConvertError, match="made for another model"):
        qconvert.quantize(folder, tmp_path / "m.q", imatrix=d / "s.imatrix")


def test_a_model_container_is_not_an_imatrix(tmp_path):
    qconvert.quantize(make_hf_folder(tmp_path / "t"), tmp_path / "m.q")
    with pytest.raises(QConvertError, match="not an importance matrix"):
        load_imatrix(tmp_path / "m.q")
