"""GGUF export: a re-wrap, not a re-quantization; gguf-py and (when installed) llama.cpp read it."""

from __future__ import annotations

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.export.gguf import export_gguf
from qconvert.runtime.generate import generate
from qconvert.runtime.models import load_model
from qconvert.runtime.tokenizer import Tokenizer
from qconvert.sources.gguf import open_gguf
from tests.conftest import SHARED, SMOLLM_GGUF, STORIES, make_hf_folder, need_shared

gguf = pytest.importorskip("gguf")


def _round_trip_bytes_equal(container_path, gguf_path):
    """Re-importing the export gives every tensor's container bytes back, bit for bit."""
    with qconvert.load(container_path) as c, open_gguf(gguf_path) as src:
        by_name = {t.name: t for t in src.tensors}
        assert set(by_name) == set(c.tensors)
        for name, info in c.tensors.items():
            t = by_name[name]
            assert t.dtype == info.block_type.name and t.shape == info.shape, name
            assert np.array_equal(t.load_raw().reshape(-1), c.raw(name).reshape(-1)), name


@pytest.mark.shared
def test_smollm2_q8_0_export_reads_back_with_gguf_py_and_our_reader(tmp_path):
    need_shared(SMOLLM_GGUF)
    qconvert.quantize(SMOLLM_GGUF, tmp_path / "s.q8", bits=8, allow_requantize=True)
    with qconvert.load(tmp_path / "s.q8") as c:
        summary = export_gguf(c, tmp_path / "s.gguf")
    assert summary["types"] == {"F32": 61, "Q8_0": 211} and summary["file_type"] == 7
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    original = gguf.GGUFReader(str(SMOLLM_GGUF))
    ours = {t.name: t for t in reader.tensors}
    theirs = {t.name: t for t in original.tensors}
    assert set(ours) == set(theirs)
    for name in ("blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        a = gguf.quants.dequantize(ours[name].data, ours[name].tensor_type)
        b = gguf.quants.dequantize(theirs[name].data, theirs[name].tensor_type)
        # same layout (q/k pair-permuted again): only the Q4_1 -> Q8_0 rounding differs
        assert a.shape == b.shape and np.abs(a - b).max() <= 0.02 * np.abs(b).max(), name
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 30
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 3
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"
    _round_trip_bytes_equal(tmp_path / "s.q8", tmp_path / "s.gguf")


@pytest.mark.shared
def test_hf_source_export_keeps_tokenizer_and_model(tmp_path):
    """stories260K (HF, SentencePiece-style BPE): the exported GGUF tokenizes and generates the same."""
    need_shared(STORIES)
    qconvert.quantize(STORIES, tmp_path / "s.q8", bits=8)
    with qconvert.load(tmp_path / "s.q8") as c:
        export_gguf(c, tmp_path / "s.gguf")
        tok_hf = Tokenizer.from_container(c)
    qconvert.quantize(tmp_path / "s.gguf", tmp_path / "back.q", keep=".*")
    _round_trip_bytes_equal(tmp_path / "s.q8", tmp_path / "s.gguf")
    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text()[:3000]
    with qconvert.load(tmp_path / "back.q") as back:
        tok_gguf = Tokenizer.from_container(back)
        assert tok_gguf.encode("Once upon a time") == tok_hf.encode("Once upon a time")
        assert tok_gguf.encode(text.replace("\n", " ")) == tok_hf.encode(text.replace("\n", " "))
        model = load_model(back)
        ids = tok_gguf.encode("Once upon a time")
        text_out = tok_gguf.decode(ids + generate(model, ids, max_tokens=30).ids, skip_special=True)
    assert text_out.startswith("Once upon a time, there was a little girl named Lily.")


def test_non_llama_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g")
    qconvert.quantize(tmp_path / "g", tmp_path / "g.q", bits=8)
    with qconvert.load(tmp_path / "g.q") as c, pytest.raises(QConvertError, match="decoder language models"):
        export_gguf(c, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_container_without_tokenizer_is_refused_and_leaves_no_file(tmp_path):
    qconvert.quantize(make_hf_folder(tmp_path / "t"), tmp_path / "m.q")
    with qconvert.load(tmp_path / "m.q") as c, pytest.raises(QConvertError, match="no tokenizer"):
        export_gguf(c, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.q", "t"]


@pytest.mark.shared
def test_llama_cpp_runs_the_export_like_our_runtime(tmp_path):
    """Optional tier: llama.cpp (llama-cpp-python) on our exported GGUF gives our logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional reference tier)")
    need_shared(STORIES)
    qconvert.quantize(STORIES, tmp_path / "s.q8", bits=8)
    with qconvert.load(tmp_path / "s.q8") as c:
        export_gguf(c, tmp_path / "s.gguf")
        model, tok = load_model(c), Tokenizer.from_container(c)
        ids = tok.encode("Once upon a time, there was a little girl named Lily.")
        ours = model.forward(np.array(ids), model.new_cache(64))
    llm = llama_cpp.Llama(str(tmp_path / "s.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(b"Once upon a time, there was a little girl named Lily.") == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    assert np.abs(ours - theirs).max() < 1e-2 * np.abs(ours).max()
