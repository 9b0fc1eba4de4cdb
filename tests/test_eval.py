"""`qconvert eval`: llama.cpp's perplexity protocol, KLD against a reference, quality gates."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.evaluate import evaluate, make_windows, read_text
from tests.conftest import SHARED, STORIES, need_shared
from tests.test_cli import qconvert as run_cli

WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def test_windows_follow_llama_perplexity():
    tokens = list(range(100, 1400))
    w = make_windows(tokens, 512, None, bos_id=1)
    assert len(w) == 2  # 1300 tokens -> two full windows, the rest dropped
    assert w[0][0] == 1 and list(w[0][1:5]) == [101, 102, 103, 104]
    assert list(w[1][1:3]) == [613, 614]
    assert len(make_windows(tokens, 512, 1, None)) == 1 and make_windows(tokens, 512, 1, None)[0][0] == 100
    with pytest.raises(QConvertError, match="fewer than one window"):
        make_windows(tokens[:100], 512, None, None)


def test_read_text_normalises_crlf(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"a\r\nb\rc\n")
    assert read_text(tmp_path / "t.txt") == "a\nb\nc\n"


class _Uniform:
    """A model whose every prediction is uniform: perplexity must equal the vocabulary size."""

    vocab_size = 50

    def new_cache(self, n):
        return None

    def forward(self, ids, cache, all_logits=True):
        return np.zeros((len(ids), self.vocab_size), np.float32)


def test_uniform_model_has_perplexity_equal_to_vocab_size_and_zero_kld():
    tokens = list(np.random.default_rng(0).integers(0, 50, 300))
    r = evaluate(_Uniform(), tokens, ctx=64, reference=_Uniform())
    assert r.chunks == 4 and r.tokens_scored == 4 * 31
    assert r.ppl == pytest.approx(50.0)
    assert r.reference["kld_mean"] == pytest.approx(0.0, abs=1e-12) and r.reference["ppl_ratio"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def stories_q(tmp_path_factory):
    need_shared(STORIES)
    d = tmp_path_factory.mktemp("eval")
    qconvert.quantize(STORIES, d / "s.q8", bits=8)
    qconvert.quantize(STORIES, d / "s.q4", bits=4)
    qconvert.quantize(STORIES, d / "s.f32", method="f32")
    return d


@pytest.mark.shared
def test_q8_0_against_its_f32_source_reports_kld_top1_and_ppl_ratio(stories_q):
    need_shared(WIKI)
    proc = run_cli("eval", stories_q / "s.q8", "--text", WIKI, "--reference", STORIES, "--chunks", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    ref = r["reference"]
    assert r["chunks"] == 4 and r["tokens_scored"] == 4 * 255
    assert 0 < ref["kld_mean"] < 0.01
    assert 0.9 < ref["top1_agreement"] < 1.0
    assert abs(ref["ppl_ratio"] - 1) < 0.01
    assert r["gate"] == {"passed": True, "failures": []}
    # the reference given as a container gives the same numbers as the source converted on the fly
    proc2 = run_cli("eval", stories_q / "s.q8", "--text", WIKI, "--reference", stories_q / "s.f32", "--chunks", "4", "--json")
    assert json.loads(proc2.stdout)["reference"] == ref


@pytest.mark.shared
def test_quality_gate_passes_and_fails_as_asked(stories_q):
    need_shared(WIKI)
    args = ["eval", stories_q / "s.q4", "--text", WIKI, "--reference", stories_q / "s.f32", "--chunks", "2"]
    ok = run_cli(*args, "--max-kld", "1.0", "--max-ppl-ratio", "2.0")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli(*args, "--max-kld", "0.0001", "--json")
    assert bad.returncode == 3
    result = json.loads(bad.stdout)
    assert result["gate"]["passed"] is False and "mean KLD" in result["gate"]["failures"][0]
    assert "quality gate failed: mean KLD" in bad.stderr
    bad_ratio = run_cli(*args, "--max-ppl-ratio", "1.0000001")
    assert bad_ratio.returncode == 3 and "PPL ratio" in bad_ratio.stderr


@pytest.mark.shared
def test_gate_without_reference_is_a_usage_error(stories_q):
    proc = run_cli("eval", stories_q / "s.q8", "--text", need_shared(WIKI), "--max-kld", "0.1")
    assert proc.returncode == 1 and "need --reference" in proc.stderr


@pytest.mark.shared
def test_run_cli_streams_the_documented_greedy_text(stories_q):
    proc = run_cli("run", stories_q / "s.f32", "--prompt", "Once upon a time", "--max-tokens", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day,"
    )
    assert "tokens/s" in proc.stderr
    js = json.loads(run_cli("run", stories_q / "s.f32", "--prompt", "Once upon a time", "-n", "5", "--json").stdout)
    assert js["generated_tokens"] == 5 and js["text"] == ", there was a little"
