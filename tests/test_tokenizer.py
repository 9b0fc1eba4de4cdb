"""The runtime tokenizer: ids equal the reference tokenizers, decode round-trips, streaming decode.

References: transformers' ``AutoTokenizer`` for Hugging Face folders and for GGUF files (it
rebuilds the tokenizer from the GGUF metadata), and sentencepiece for a llama.cpp-style
SentencePiece GGUF written here from stories260K's ``tokenizer.model``. Tests that need the real
models in ../shared skip with a reason when it is absent; those that need transformers,
sentencepiece or gguf skip when the package is missing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import qconvert
from qconvert.errors import QConvertError
from qconvert.runtime.tokenizer import Tokenizer
from tests.conftest import make_hf_folder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOLLM_DIR = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf"
SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

UNICODE = "Ünïcödé naïve café — 日本語のテキスト, 한국어, Ελληνικά, русский текст"
EMOJI = "Emojis: 😀👍🏽 🇫🇷 ❤️ and a zero-width\u200bjoiner"
DIGITS = "In 1999 she paid 12345 dollars, i.e. 3.14159 * 1,000,000 / 0x1F = 42%."
CODE = (
    'def f(x):\n    """Doc."""\n    return {"a": [x ** 2 for x in range(10)]}  # comment\n'
    "\n\tif x != 0: pass\n"
)
SPACES = "a  b   c\n\n\n   d \t e\r\n f  "
CHAT = "<|im_start|>user\nhi<|im_end|>"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared/ folder beside the repo with real models and data); absent here")
    return path


@pytest.fixture(scope="module")
def wiki() -> str:
    return _need(WIKI).read_bytes().decode("utf-8").replace("\r\n", "\n")


# ---------------------------------------------------------------------------------------------
# stories260K: Hugging Face folder with a SentencePiece-converted tokenizer.json


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("stories") / "s.q8"
    qconvert.quantize(_need(STORIES), out, method="rtn", bits=8)
    with qconvert.load(out) as c:
        return Tokenizer.from_container(c)


@pytest.fixture(scope="module")
def stories_ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(_need(STORIES)))


def stories_texts(wiki: str) -> list[str]:
    return [
        "Once upon a time, there was a little girl named Lily.",
        "Tom and Lily went to the park.\nThey saw a big red ball!",
        wiki[:5000],
        UNICODE,
        EMOJI,
        DIGITS,
        SPACES,
        " leading space",
    ]


def test_stories_ids_equal_transformers_with_its_bos(stories, stories_ref, wiki) -> None:
    for text in stories_texts(wiki):
        ours = stories.encode(text)
        assert ours == stories_ref(text)["input_ids"], text[:60]
        assert ours[0] == stories.bos_id == 1  # tokenizer_config says add_bos_token: true


def test_stories_decode_round_trips_and_equals_transformers(stories, stories_ref, wiki) -> None:
    for text in stories_texts(wiki):
        ids = stories.encode(text)
        assert stories.decode(ids) == stories_ref.decode(ids)
        assert stories.decode(ids, skip_special=True) == stories_ref.decode(ids, skip_special_tokens=True)
        # the Metaspace decoder drops the one space it prepended; a text that already starts with
        # a space gets none prepended, so that space is the one dropped
        assert stories.decode(stories.encode(text, add_bos=False)) == (text[1:] if text.startswith(" ") else text)


def test_stories_special_ids_and_bos_switch(stories) -> None:
    assert stories.vocab_size == 512
    assert stories.eos_ids == {2}
    assert stories.add_bos_default
    plain = stories.encode("Hello world", add_bos=False)
    assert plain and plain[0] != 1
    assert stories.encode("Hello world", add_bos=True) == [1] + plain
    assert stories.encode("Hello world", add_eos=True) == [1] + plain + [2]


def test_hf_bos_default_follows_post_processor_then_tokenizer_config() -> None:
    tokenizer_json = (_need(STORIES) / "tokenizer.json").read_text()

    def container(hf: dict) -> SimpleNamespace:
        return SimpleNamespace(metadata={"tokenizer.json": tokenizer_json, "hf": hf, "model.config": {}}, path="x")

    # no tokenizer_config: the post-processor's TemplateProcessing adds <s>
    assert Tokenizer.from_container(container({})).encode("hi")[0] == 1
    off = Tokenizer.from_container(container({"tokenizer_config.json": {"bos_token": "<s>", "add_bos_token": False}}))
    assert off.encode("hi") == off.encode("hi", add_bos=False) and 1 not in off.encode("hi")
    assert off.bos_id == 1


# ---------------------------------------------------------------------------------------------
# SmolLM2 GGUF: byte-level BPE ("gpt2", pre "smollm") rebuilt from tokenizer.ggml.* metadata


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("smollm") / "smol.q8"
    qconvert.quantize(_need(SMOLLM_DIR / SMOLLM_NAME), out, method="rtn", bits=8, allow_requantize=True)
    with qconvert.load(out) as c:
        assert "tokenizer.json" not in c.metadata  # the test is about the GGUF metadata path
        return Tokenizer.from_container(c)


@pytest.fixture(scope="module")
def smollm_ref():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(_need(SMOLLM_DIR)), gguf_file=SMOLLM_NAME)


def smollm_texts(wiki: str) -> list[str]:
    return [
        wiki[:20000],
        CODE,
        DIGITS,
        "12345",
        "3.14159",
        SPACES,
        "    four leading spaces and trailing ones    ",
        UNICODE,
        EMOJI,
        CHAT,
        "don't I'LL we've they'd",
        "",
    ]


def test_smollm_gguf_ids_equal_transformers_gguf_tokenizer(smollm, smollm_ref, wiki) -> None:
    for text in smollm_texts(wiki):
        assert smollm.encode(text) == smollm_ref(text)["input_ids"], text[:60]


def test_smollm_decode_round_trips(smollm, wiki) -> None:
    for text in smollm_texts(wiki):
        assert smollm.decode(smollm.encode(text)) == text


def test_smollm_special_tokens_stay_whole_and_bos_is_opt_in(smollm) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.encode(CHAT) == [1, 4093, 198, 6004, 2]
    assert smollm.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # \p{N} split first
    assert smollm.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    # add_bos_token is False in the GGUF; the perplexity protocol asks for <|im_start|> itself
    assert not smollm.add_bos_default and smollm.bos_id == 1
    assert smollm.encode("hi", add_bos=True) == [1] + smollm.encode("hi")
    assert {2} <= smollm.eos_ids and smollm.token_to_id("<|im_end|>") in smollm.eos_ids
    assert smollm.decode(smollm.encode(CHAT), skip_special=True) == "user\nhi"


def test_smollm_chat_template_matches_transformers(smollm, smollm_ref) -> None:
    pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3+3?"}]
    ours = smollm.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == smollm_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|im_start|>system\n") and ours.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# streaming decode


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    stream = tok.decode_stream()
    pieces = [stream.step(i) for i in ids]
    return pieces, stream.flush()


@pytest.mark.parametrize("which", ["smollm", "stories"])
def test_incremental_decode_concatenates_to_decode(which, request, wiki) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    text = "\n".join([wiki[:6000], UNICODE, EMOJI, DIGITS, CODE, SPACES, "end"])
    ids = tok.encode(text)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids)
    assert rest == ""  # every character completed
    assert not any("\ufffd" in p for p in pieces)  # partial UTF-8 held back, never shown
    assert pieces.count("") > 0  # the emojis and CJK span several tokens each


def test_incremental_decode_holds_back_a_partial_character_until_flush(smollm) -> None:
    ids = smollm.encode("ok 😀")
    assert len(ids) >= 3  # the emoji is several byte-level tokens
    stream = smollm.decode_stream()
    shown = "".join(stream.step(i) for i in ids[:-1])
    assert shown == "ok"
    assert stream.flush() == smollm.decode(ids[:-1])[len("ok"):]  # an incomplete char comes out as U+FFFD
    assert "\ufffd" in smollm.decode(ids[:-1])


@pytest.mark.parametrize("which", ["smollm", "stories"])
def test_incremental_decode_after_a_prompt_keeps_the_first_space(which, request) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    ids = tok.encode("Once upon a time, there was a little girl.", add_bos=False)
    # cut before a token that starts a word, whose space a decoder without context would drop
    cut = next(k for k in range(2, len(ids)) if tok.decode(ids[k:k + 1]).strip() and
               tok.decode(ids[: k + 1])[len(tok.decode(ids[:k]))] == " ")
    prompt, generated = ids[:cut], ids[cut:]
    stream = tok.decode_stream(context=prompt)
    text = "".join(stream.step(i) for i in generated) + stream.flush()
    assert text == tok.decode(ids)[len(tok.decode(prompt)):]
    assert text.startswith(" ")


# ---------------------------------------------------------------------------------------------
# llama.cpp-style SentencePiece GGUF ("llama" model) written from stories260K's tokenizer.model


def _write_spm_gguf(path: Path, model_file: Path) -> None:
    gguf = pytest.importorskip("gguf")
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    pieces = list(proto.pieces)
    vocab, hidden, ffn, heads = len(pieces), 32, 64, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    # what llama.cpp's convert_hf_to_gguf writes for a sentencepiece vocabulary
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.piece for p in pieces])
    w.add_token_scores([p.score for p in pieces])
    w.add_token_types([int(p.type) for p in pieces])  # sentencepiece and GGUF number types alike
    w.add_bos_token_id(proto.trainer_spec.bos_id)
    w.add_eos_token_id(proto.trainer_spec.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.1, shape).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", t(hidden, hidden))
    w.add_tensor("blk.0.ffn_gate.weight", t(ffn, hidden))
    w.add_tensor("blk.0.ffn_up.weight", t(ffn, hidden))
    w.add_tensor("blk.0.ffn_down.weight", t(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Tokenizer:
    model_file = _need(STORIES / "tokenizer.model")
    folder = tmp_path_factory.mktemp("spm")
    _write_spm_gguf(folder / "stories-spm.gguf", model_file)
    qconvert.quantize(folder / "stories-spm.gguf", folder / "spm.q8", method="rtn", bits=8)
    with qconvert.load(folder / "spm.q8") as c:
        assert c.metadata["tokenizer.gguf"]["tokenizer.ggml.model"] == "llama"
        return Tokenizer.from_container(c)


def test_spm_gguf_ids_equal_sentencepiece(spm_gguf) -> None:
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    # single spaces and no leading space: sentencepiece's remove_extra_whitespaces (which llama.cpp
    # does not do) changes nothing here
    for text in [
        "Once upon a time, there was a little girl named Lily.",
        "Tom and Lily went to the park.\nThey saw a big red ball!",
        "The 3 cats ate 12345 fish at 10:30.",
        UNICODE,
        "Emojis: 😀👍🏽 and ❤️ hearts",
    ]:
        assert spm_gguf.encode(text, add_bos=False) == sp.encode(text), text
        assert spm_gguf.encode(text) == [sp.bos_id()] + sp.encode(text)  # add_bos_token true
        assert spm_gguf.decode(spm_gguf.encode(text, add_bos=False)) == text


def test_spm_gguf_equals_stories_tokenizer_json_on_wikitext(spm_gguf, stories, wiki) -> None:
    # merges derived from the GGUF scores reproduce the HF conversion's merge list
    text = wiki[:5000].lstrip(" ")
    assert spm_gguf.encode(text) == stories.encode(text)


def test_spm_gguf_prefix_space_after_special_tokens_and_leading_space_kept(spm_gguf) -> None:
    # llama.cpp prepends a space at the start and after every special token, even to a text that
    # already starts with one, and its decoder drops only that one
    assert spm_gguf.encode("<s>Once", add_bos=False) == [1] + spm_gguf.encode("Once", add_bos=False)
    assert spm_gguf.decode(spm_gguf.encode(" Once", add_bos=False)) == " Once"
    assert spm_gguf.eos_ids == {2} and spm_gguf.bos_id == 1


# ---------------------------------------------------------------------------------------------
# without ../shared: a small byte-level vocabulary, and errors


def _tiny_bpe_metadata(prefix: str = "tokenizer.ggml.") -> dict:
    from qconvert.runtime.tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o"]
    merged = ["Ġt", "he", "Ġthe", "ll", "hell", "hello"]
    tokens = specials + alphabet + merged
    return {
        prefix + "model": "gpt2",
        prefix + "pre": "gpt-2",
        prefix + "tokens": tokens,
        prefix + "token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        prefix + "merges": merges,
        prefix + "bos_token_id": 1,
        prefix + "eos_token_id": 2,
        prefix + "add_bos_token": False,
    }


@pytest.mark.parametrize("prefix", ["tokenizer.ggml.", ""])
def test_tiny_byte_level_gguf_vocabulary(prefix) -> None:
    tok = Tokenizer.from_gguf_metadata(_tiny_bpe_metadata(prefix))
    ids = tok.encode("<|im_start|>hello the Ω<|im_end|>")
    assert [tok.id_to_token(i) for i in ids] == ["<|im_start|>", "hello", "Ġthe", "Ġ", "Î", "©", "<|im_end|>"]
    assert tok.decode(ids) == "<|im_start|>hello the Ω<|im_end|>"
    assert tok.eos_ids == {0, 2} and tok.encode("he", add_bos=True)[0] == 1
    pieces, rest = _stream(tok, tok.encode("ΩΩ"))
    assert pieces == ["", "Ω", "", "Ω"] and rest == ""


SPLIT_TEXT = "Hello 12345 world!!\n\nx"


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("gpt-2", ["Hello", "Ġ12345", "Ġworld", "!!", "Ċ", "Ċ", "x"]),
        ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "!!", "Ċ", "Ċ", "x"]),
        ("llama-bpe", ["Hello", "Ġ", "123", "45", "Ġworld", "!!ĊĊ", "x"]),
        ("qwen2", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "!!ĊĊ", "x"]),
    ],
)
def test_gguf_pre_tokenizer_splits_like_llama_cpp(pre, pieces) -> None:
    meta = dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.pre": pre})
    backend = Tokenizer.from_gguf_metadata(meta).backend
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(SPLIT_TEXT)] == pieces


def test_every_known_pre_tokenizer_builds_and_round_trips() -> None:
    from qconvert.runtime.tokenizer import BPE_PRE_TOKENIZERS

    text = SPLIT_TEXT + " Ünï 日本語 😀 don't"
    for pre in BPE_PRE_TOKENIZERS:
        tok = Tokenizer.from_gguf_metadata(dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.pre": pre}))
        assert tok.decode(tok.encode(text)) == text, pre


def test_unknown_gguf_tokenizer_model_is_a_clear_error() -> None:
    meta = dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(QConvertError, match="tokenizer model 'bert' is not supported"):
        Tokenizer.from_gguf_metadata(meta)
    meta = dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(QConvertError, match="pre-tokenizer 'no-such-pre' is not supported"):
        Tokenizer.from_gguf_metadata(meta)


def test_container_without_tokenizer_is_a_clear_error(tmp_path) -> None:
    out = tmp_path / "t.q8"
    qconvert.quantize(make_hf_folder(tmp_path / "tiny"), out, method="rtn", bits=8)
    with qconvert.load(out) as c, pytest.raises(QConvertError, match="carries no tokenizer"):
        Tokenizer.from_container(c)


# -- hostile tokenizer metadata (issue #14 B.2, B.10) ---------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens is not a non-empty list of strings"),
        ({"tokenizer.ggml.merges": [["h", "e"]]}, "tokenizer.ggml.merges is not a list of strings"),
        ({"tokenizer.ggml.token_type": [1]}, "has 265 tokens but 1 tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.pre": ["gpt-2"]}, "tokenizer.ggml.pre is not a string"),
        ({"tokenizer.ggml.merges": ["h e", "x y"]}, "vocabulary and merges disagree: .*Token `xy` out of vocabulary"),
    ],
)
def test_malformed_gguf_tokenizer_metadata_is_one_sentence(change, message) -> None:
    meta = dict(_tiny_bpe_metadata(), **change)
    with pytest.raises(QConvertError, match=message):
        Tokenizer.from_gguf_metadata(meta)


def test_quantize_time_check_refuses_broken_but_not_unsupported_tokenizers() -> None:
    """A vocabulary whose merges name missing tokens is refused at import; a valid tokenizer of a
    kind the runtime does not build (model 'bert') is not the import's business."""
    from qconvert.runtime.tokenizer import UnsupportedTokenizer, check_source_tokenizer

    def source(meta):
        return SimpleNamespace(tokenizer_json=None, config={}, extra_metadata={"tokenizer.gguf": meta})

    check_source_tokenizer(source(_tiny_bpe_metadata()))
    unsupported = dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.model": "bert"})
    check_source_tokenizer(source(unsupported))
    with pytest.raises(UnsupportedTokenizer):
        Tokenizer.from_metadata({"tokenizer.gguf": unsupported})
    with pytest.raises(QConvertError, match="vocabulary and merges disagree"):
        check_source_tokenizer(source(dict(_tiny_bpe_metadata(), **{"tokenizer.ggml.merges": ["x y"]})))


def test_hf_tokenizer_ignores_aux_metadata_of_the_wrong_type() -> None:
    """A container's ``hf`` / ``model.config`` keys are JSON objects (the reader checks), but what
    they hold is not: a tokenizer_config that is a list is ignored, not a crash."""
    text = (_need(STORIES) / "tokenizer.json").read_text()
    tok = Tokenizer.from_metadata({"tokenizer.json": text, "hf": {"tokenizer_config.json": [1], "generation_config.json": "x"},
                                   "model.config": {"eos_token_id": {"a": 1}}})
    assert tok.decode(tok.encode("Once upon a time"), skip_special=True) == "Once upon a time"


@pytest.mark.parametrize("special", [{"id": {"a": 1}, "type_id": 0}, {"id": "<zz>", "type_id": 0}])
def test_post_processor_naming_an_undefined_special_token_is_refused(special) -> None:
    """tokenizers would panic (a BaseException with a Rust backtrace); found by the fuzzer: a
    dict where the token's name belongs crashed the check itself (unhashable type)."""
    import json

    doc = json.loads((_need(STORIES) / "tokenizer.json").read_text())
    doc["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": special}],
                             "pair": "not a list", "special_tokens": {}}
    with pytest.raises(QConvertError, match="post-processor adds the special token"):
        Tokenizer.from_metadata({"tokenizer.json": json.dumps(doc)})
