"""Text <-> token ids for a container, on the ``tokenizers`` library.

Two sources of truth, depending on where the checkpoint came from:

* Hugging Face: the container carries ``tokenizer.json`` verbatim; it is loaded as it is, and
  ``tokenizer_config.json`` / ``generation_config.json`` (metadata ``hf``) say whether BOS is
  added and which ids end a turn.
* GGUF: the container carries llama.cpp's ``tokenizer.ggml.*`` keys (metadata
  ``tokenizer.gguf``). From them we build the tokenizer llama.cpp would run
  (``src/llama-vocab.cpp``):

  - ``gpt2``: byte-level BPE. The text is first cut by the pre-tokenizer regexes llama.cpp
    picks for ``tokenizer.ggml.pre`` (applied one after the other, each splitting the pieces the
    previous one left, matched and unmatched parts both kept), then each piece is spelled in
    GPT-2's byte alphabet and merged with the file's merge list.
  - ``llama``: SentencePiece BPE. Spaces become ``▁``, a ``▁`` is prepended to each run of text
    (at the start and after every special token) when ``add_space_prefix`` holds, and pieces are
    merged best score first; a character the vocabulary lacks falls back to its ``<0xNN>`` byte
    tokens. ``tokenizers`` runs BPE by merge rank, so the merges are derived from the scores:
    every way to cut a token into two tokens, ranked by the token's score.

  Tokens typed CONTROL (3) or USER_DEFINED (4) are matched whole in the input text, as llama.cpp
  does, so ``<|im_start|>`` never gets cut into pieces.

BOS: ``encode(text)`` adds what the model asks for (``add_bos_token`` of tokenizer_config or the
GGUF, else the tokenizer.json post-processor, else llama.cpp's default for the vocabulary type).
Evaluation protocols that always want a BOS pass ``add_bos=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from .. import safejson
from ..errors import QConvertError

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

T = TypeVar("T")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while native code runs: a Rust panic prints its message and
    backtrace there before it becomes a Python exception, and the user should see one line."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _native(call: Callable[[], T], what: str) -> T:
    """Run a ``tokenizers`` call; its errors, panics included, become one QConvertError.

    A Rust panic surfaces as ``pyo3_runtime.PanicException``, a BaseException that no
    ``except Exception`` catches."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except QConvertError:
        raise
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QConvertError(f"{what}: {detail}") from None


# GGUF token types (gguf-py TokenType / llama.cpp llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Texts of tokens that end a turn or a document in common chat vocabularies; llama.cpp treats the
# same set as end-of-generation when the vocabulary has them.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
)

# ---------------------------------------------------------------------------------------------
# llama.cpp pre-tokenizer regexes, by ``tokenizer.ggml.pre`` (llama-vocab.cpp, llm_tokenizer_bpe).
# llama.cpp rewrites a few of them for its own regex engine; these are the original forms, which
# Oniguruma (used by ``tokenizers``) runs as they are.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_LLAMA3_SPLITS = (_LLAMA3,)
_QWEN2_SPLITS = (_QWEN2,)
_GPT2_SPLITS = (_GPT2,)
_STARCODER_SPLITS = (r"\p{N}", _GPT2)  # digits one by one, then GPT-2

# name -> (regexes applied in order, ignore_merges, llama.cpp's add_bos default)
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": (_DEFAULT_SPLITS, False, False),
    **{n: (_LLAMA3_SPLITS, True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                                 "pixtral", "midm-2.0", "lfm2")},
    **{n: (_LLAMA3_SPLITS, False, False) for n in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")},
    **{n: (_GPT2_SPLITS, False, False) for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                                "jina-v2-de", "a.x-4.0", "mellum", "mpt", "olmo", "jais",
                                                "exaone4", "trillion", "granite-docling")},
    **{n: (_STARCODER_SPLITS, False, False) for n in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                                     "exaone", "minerva-7b")},
    **{n: (_QWEN2_SPLITS, False, False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2",
                                                 "hunyuan", "grok-2")},
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False, False),
    "deepseek-coder": ((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"), False, False),
    "gpt-4o": ((_GPT4O,), False, False),
    "llama4": ((_GPT4O,), False, False),
    "tekken": ((_TEKKEN,), True, True),
    "poro-chat": ((_PORO,), False, False),
    "bloom": ((_PORO,), False, False),
    "gpt3-finnish": ((_PORO,), False, False),
    "viking": ((_PORO, r"\p{N}"), False, False),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest move to U+0100..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizers.Tokenizer


class _GGUFKeys:
    """Look up ``tokenizer.ggml.X`` whether the container kept the ``tokenizer.ggml.`` prefix or not."""

    def __init__(self, kv: Mapping[str, Any]) -> None:
        self.kv = kv

    def get(self, key: str, default: Any = None) -> Any:
        for k in (f"tokenizer.ggml.{key}", f"ggml.{key}", key, f"tokenizer.{key}"):
            if k in self.kv:
                return self.kv[k]
        return default


def _special_added_tokens(tokens: list[str], types: list[int] | None, vocab: Mapping[str, int]) -> list:
    """CONTROL and USER_DEFINED tokens, matched whole in raw text (llama.cpp tokenizer_st_partition)."""
    if not types:
        return []
    out = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and tok and vocab.get(tok) == i:
            out.append(AddedToken(tok, special=ty == TOKEN_CONTROL, normalized=False))
    return out


def _vocab_of(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if not tok:
            tok = f"[EMPTY_{i}]"  # llama.cpp renames empty tokens the same way
        vocab.setdefault(tok, i)  # a duplicate keeps its first id, as llama.cpp's text_to_token does
    return vocab


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        pos = m.find(" ", 1)  # llama.cpp: the separating space is the first one after position 0
        if pos < 0:
            raise QConvertError(f"GGUF tokenizer merge {m!r} has no space separating its two parts")
        out.append((m[:pos], m[pos + 1 :]))
    return out


def _merges_from_scores(
    vocab: Mapping[str, int], scores: list[float], types: list[int] | None
) -> list[tuple[str, str]]:
    """SentencePiece BPE as merge ranks: a token is reached by joining any two tokens that spell it,
    and joins are made best token score first (ties: lower token id first)."""
    mergeable = {
        tok: i for tok, i in vocab.items()
        if types is None or i >= len(types) or types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)
    }
    ranked = []
    for tok, i in mergeable.items():
        score = scores[i] if i < len(scores) else 0.0
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, mergeable[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_gpt2(keys: _GGUFKeys) -> tuple[tokenizers.Tokenizer, bool]:
    tokens = list(keys.get("tokens") or [])
    types = keys.get("token_type")
    merges = keys.get("merges")
    if merges is None:
        raise QConvertError("GGUF byte-level BPE tokenizer (model 'gpt2') has no tokenizer.ggml.merges list")
    pre = keys.get("pre") or "default"
    if pre not in BPE_PRE_TOKENIZERS:
        raise UnsupportedTokenizer(
            f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(BPE_PRE_TOKENIZERS))}"
        )
    splits, ignore_merges, add_bos_default = BPE_PRE_TOKENIZERS[pre]
    vocab = _vocab_of(tokens)
    unk_id = keys.get("unknown_token_id")
    model = _native(lambda: models.BPE(
        vocab=vocab,
        merges=_split_merges(merges),
        unk_token=tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None,
        ignore_merges=ignore_merges,
    ), "the GGUF tokenizer's vocabulary and merges disagree")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _native(lambda: tok.add_special_tokens(_special_added_tokens(tokens, types, vocab)), "the GGUF tokenizer's special tokens")
    return tok, add_bos_default


def _build_spm(keys: _GGUFKeys) -> tuple[tokenizers.Tokenizer, bool]:
    tokens = list(keys.get("tokens") or [])
    types = keys.get("token_type")
    scores = keys.get("scores")
    vocab = _vocab_of(tokens)
    if keys.get("merges") is not None:
        merges = _split_merges(keys.get("merges"))
    elif scores is not None:
        merges = _merges_from_scores(vocab, list(scores), types)
    else:
        raise QConvertError("GGUF SentencePiece tokenizer (model 'llama') has neither scores nor merges")
    unk_id = keys.get("unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    model = _native(lambda: models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True),
                    "the GGUF tokenizer's vocabulary and merges disagree")
    tok = tokenizers.Tokenizer(model)
    add_space_prefix = keys.get("add_space_prefix", True)
    # llama.cpp: ' ' + text at the start and after each special token, then ' ' -> '▁'. A normalizer
    # runs per run of text between special tokens, which is exactly that; Metaspace would not
    # prepend to a text that already starts with a space.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    _native(lambda: tok.add_special_tokens(_special_added_tokens(tokens, types, vocab)), "the GGUF tokenizer's special tokens")
    return tok, True


_GGUF_BUILDERS = {"gpt2": _build_gpt2, "llama": _build_spm}


class UnsupportedTokenizer(QConvertError):
    """A well-formed tokenizer of a kind qconvert's runtime does not build (the model can still
    be quantized; it cannot be run)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# tokenizer.ggml.X -> (what it must be, a check); absent keys are fine
_GGUF_KEY_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a string", lambda v: isinstance(v, str)),
    "pre": ("a string", lambda v: isinstance(v, str)),
    "tokens": ("a non-empty list of strings", lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v)),
    "merges": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v)),
    "scores": ("a list of numbers", lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)),
    "token_type": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
    "add_space_prefix": ("true or false", lambda v: isinstance(v, bool)),
}


def check_gguf_tokenizer_keys(keys: "_GGUFKeys") -> None:
    """The types llama.cpp gives each ``tokenizer.ggml.*`` key, and lists that agree in length."""
    if keys.get("tokens") is None:
        raise QConvertError("GGUF tokenizer metadata has no tokenizer.ggml.tokens list")
    for key, (want, ok) in _GGUF_KEY_CHECKS.items():
        value = keys.get(key)
        if value is not None and not ok(value):
            raise QConvertError(f"GGUF tokenizer metadata tokenizer.ggml.{key} is not {want}")
    n = len(keys.get("tokens"))
    for key in ("scores", "token_type"):
        value = keys.get(key)
        if value is not None and len(value) != n:
            raise QConvertError(
                f"GGUF tokenizer metadata has {n} tokens but {len(value)} tokenizer.ggml.{key}; they must agree"
            )


def tokenizer_from_gguf_metadata(kv: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, bool]:
    """``(tokenizer, llama.cpp's add_bos default)`` for GGUF ``tokenizer.ggml.*`` keys."""
    keys = _GGUFKeys(kv)
    check_gguf_tokenizer_keys(keys)
    kind = keys.get("model")
    if kind not in _GGUF_BUILDERS:
        raise UnsupportedTokenizer(
            f"GGUF tokenizer model {kind!r} is not supported; qconvert builds 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece) tokenizers"
        )
    return _GGUF_BUILDERS[kind](keys)


# ---------------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    """A JSON object from a container (or {} when a hostile file holds something else)."""
    return value if isinstance(value, Mapping) else {}


def check_post_processor(tokenizer_json: str) -> None:
    """tokenizers panics (a Rust backtrace, a BaseException) when a TemplateProcessing
    post-processor names a special token its ``special_tokens`` table lacks; refuse such a
    tokenizer.json with one sentence before the library sees it."""
    if "TemplateProcessing" not in tokenizer_json:
        return  # the only post-processor known to panic; no need to parse the whole file
    doc = safejson.loads(tokenizer_json, "tokenizer.json")
    if not isinstance(doc, dict):
        raise QConvertError("tokenizer.json is not a JSON object")
    stack = [doc.get("post_processor")]
    while stack:
        pp = stack.pop()
        if not isinstance(pp, dict):
            continue
        if pp.get("type") == "Sequence":
            processors = pp.get("processors")
            stack.extend(processors if isinstance(processors, list) else [])
            continue
        if pp.get("type") != "TemplateProcessing":
            continue
        table = pp.get("special_tokens")
        table = table if isinstance(table, dict) else {}
        for name in ("single", "pair"):
            pieces = pp.get(name)
            for piece in pieces if isinstance(pieces, list) else []:
                special = piece.get("SpecialToken") if isinstance(piece, dict) else None
                token = special.get("id") if isinstance(special, dict) else None
                if token is not None and (not isinstance(token, str) or token not in table):
                    raise QConvertError(
                        f"tokenizer.json's post-processor adds the special token {token!r}, which its"
                        " special_tokens table does not define"
                    )
        for token, entry in table.items():
            ids = entry.get("ids") if isinstance(entry, dict) else None
            tokens = entry.get("tokens") if isinstance(entry, dict) else None
            if not isinstance(ids, list) or not isinstance(tokens, list) or len(ids) != len(tokens):
                raise QConvertError(f"tokenizer.json's post-processor entry for {token!r} needs as many ids as tokens")


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Encode/decode for one model. Build it with :meth:`from_container`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int] = (),
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        # tokenizer.json may pad or truncate (MiniLM pads to 128): ids here are always exact
        backend.no_padding()
        backend.no_truncation()
        self.bos_id = bos_id
        eos_ids = list(eos_ids)
        # The model's default affixes: explicit flags win, otherwise what the post-processor adds.
        prefix, suffix = self._post_processor_affixes()
        if add_bos is not None:
            prefix = [bos_id] if add_bos and bos_id is not None else []
        if add_eos is not None:
            suffix = eos_ids[:1] if add_eos else []
        self._default_prefix, self._default_suffix = prefix, suffix
        self.add_bos_default = bool(prefix) and prefix == [bos_id]
        eos = set(eos_ids)
        for text in END_OF_TURN_TOKENS:
            i = backend.token_to_id(text)
            if i is not None and self._is_added(text):
                eos.add(i)
        self.eos_ids: set[int] = eos
        self.eos_id: int | None = eos_ids[0] if eos_ids else None
        self.chat_template = chat_template

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_container(cls, container: Any) -> "Tokenizer":
        tok = cls.from_metadata(container.metadata)
        if tok is None:
            raise QConvertError(
                f"container {getattr(container, 'path', '')} carries no tokenizer (neither tokenizer.json nor GGUF "
                "tokenizer metadata); convert from a source that has one"
            )
        return tok

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer | None":
        """The tokenizer of a container's metadata (``tokenizer.json`` + ``hf``, or
        ``tokenizer.gguf``), None when it has none."""
        config = _mapping(meta.get("model.config"))
        if isinstance(meta.get("tokenizer.json"), str):
            return cls._from_hf(meta["tokenizer.json"], meta.get("hf") or {}, config)
        if isinstance(meta.get("tokenizer.gguf"), Mapping):
            return cls.from_gguf_metadata(meta["tokenizer.gguf"], config)
        return None

    @classmethod
    def from_gguf_metadata(cls, kv: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> "Tokenizer":
        backend, add_bos_default = tokenizer_from_gguf_metadata(kv)
        keys = _GGUFKeys(kv)
        bos = keys.get("bos_token_id")
        eos = _ids(keys.get("eos_token_id")) + _ids(keys.get("eot_token_id")) + _ids(keys.get("eom_token_id"))
        eos += [i for i in _ids(_mapping(config).get("eos_token_id")) if i not in eos]
        add_bos = keys.get("add_bos_token")
        add_eos = keys.get("add_eos_token")
        template = kv.get("tokenizer.chat_template", kv.get("chat_template"))
        return cls(
            backend,
            bos_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
            eos_ids=eos,
            add_bos=add_bos if isinstance(add_bos, bool) else add_bos_default,
            add_eos=add_eos if isinstance(add_eos, bool) else False,
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def _from_hf(cls, tokenizer_json: str, hf: Mapping[str, Any], config: Mapping[str, Any]) -> "Tokenizer":
        check_post_processor(tokenizer_json)
        with _quiet_stderr():
            backend = _native(lambda: tokenizers.Tokenizer.from_str(tokenizer_json), "tokenizer.json cannot be loaded")
        hf = _mapping(hf)
        tok_config = _mapping(hf.get("tokenizer_config.json"))
        gen_config = _mapping(hf.get("generation_config.json"))
        special_map = _mapping(hf.get("special_tokens_map.json"))
        config = _mapping(config)

        def token_id(name: str) -> int | None:
            text = _token_text(tok_config.get(name)) or _token_text(special_map.get(name))
            return backend.token_to_id(text) if text is not None else None

        bos = token_id("bos_token")
        if bos is None:
            bos = next(iter(_ids(config.get("bos_token_id")) or _ids(gen_config.get("bos_token_id"))), None)
        eos: list[int] = []
        for i in [token_id("eos_token")] + _ids(gen_config.get("eos_token_id")) + _ids(config.get("eos_token_id")):
            if i is not None and i not in eos:
                eos.append(i)
        add_bos = tok_config.get("add_bos_token")
        add_eos = tok_config.get("add_eos_token")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return cls(
            backend,
            bos_id=bos,
            eos_ids=eos,
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            add_eos=add_eos if isinstance(add_eos, bool) else None,
            chat_template=template if isinstance(template, str) else None,
        )

    def _post_processor_affixes(self) -> tuple[list[int], list[int]]:
        with _quiet_stderr():
            plain = _native(lambda: self.backend.encode("a", add_special_tokens=False).ids, "the tokenizer cannot encode")
            full = _native(lambda: self.backend.encode("a", add_special_tokens=True).ids,
                           "the tokenizer's post-processor cannot add its special tokens")
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return full[:k], full[k + len(plain) :]
        return [], []

    def _is_added(self, text: str) -> bool:
        return any(t.content == text for t in self.backend.get_added_tokens_decoder().values())

    # -- the API --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``. ``add_bos``/``add_eos``: None follows the model's default.

        Special-token texts such as ``<|im_start|>`` in ``text`` become their ids."""
        ids = _native(lambda: self.backend.encode(text, add_special_tokens=False).ids, "the tokenizer cannot encode this text")
        if add_bos is None:
            prefix = self._default_prefix
        else:
            prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        if add_eos is None:
            suffix = self._default_suffix
        else:
            suffix = [self.eos_id] if add_eos and self.eos_id is not None else []
        return prefix + ids + suffix

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        return _native(lambda: self.backend.decode(ids, skip_special_tokens=skip_special), "the tokenizer cannot decode")

    def decode_stream(self, skip_special: bool = False, context: Iterable[int] = ()) -> "DecodeStream":
        """An incremental decoder; ``context`` are ids already shown, e.g. the prompt."""
        return DecodeStream(self, skip_special=skip_special, context=context)

    def token_to_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the model's Jinja chat template (needs the ``jinja2`` package)."""
        if not self.chat_template:
            raise QConvertError("this model has no chat template; format the prompt yourself")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise QConvertError("rendering a chat template needs the 'jinja2' package; pip install jinja2") from None

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.id_to_token(self.eos_id) if self.eos_id is not None else ""
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=bos, eos_token=eos, **kwargs,
            )
        except TemplateError as e:
            raise QConvertError(f"the model's chat template failed: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)})"


# Letters, digits, punctuation, spaces, a newline, accents, CJK and an emoji: one pass through
# the normalizer, pre-tokenizer, model, post-processor and decoder.
PROBE_TEXT = "Hello, world! 123 4567 naïve café ✓ 日本語 🙂\n\t  end."


def check_source_tokenizer(source: Any) -> None:
    """Build the tokenizer a container of this source will carry and run it once, so that a
    broken tokenizer (vocabulary and merges that disagree, a post-processor naming an unknown
    special token, malformed GGUF tokenizer keys) is refused at quantize time, not at ``run``.
    A well-formed tokenizer of a kind the runtime does not build is not an error here."""
    meta: dict[str, Any] = {**source.extra_metadata, "model.config": source.config}
    if source.tokenizer_json is not None:
        meta["tokenizer.json"] = source.tokenizer_json
    try:
        tok = Tokenizer.from_metadata(meta)
    except UnsupportedTokenizer:
        return
    if tok is not None:
        with _quiet_stderr():
            tok.decode(tok.encode(PROBE_TEXT, add_bos=True, add_eos=True))


class DecodeStream:
    """Text of a growing id sequence, one piece per id, for streaming output.

    Each step decodes a short window (the previous token for context, plus the tokens not yet
    shown) and returns what it adds to the window without the new tokens, so spaces that depend
    on the previous token come out right. Text that ends in an incomplete UTF-8 sequence (a byte
    token, or a byte-level token holding part of a character) is held back until it completes;
    :meth:`flush` returns whatever is still held. ``"".join(pieces) + flush()`` equals
    ``tokenizer.decode(ids)``.

    ``context``: ids already shown (the prompt), so that the first new token is spelled as it is
    after them (a SentencePiece decoder drops the leading space of a text's first token).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, context: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = [int(i) for i in context]
        self._read = len(self.ids)  # ids[:_read] have been shown
        self._prefix = max(0, self._read - 1)  # window start: context before the unshown ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special) if ids else ""

    def step(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        shown = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(shown) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes as U+FFFD)."""
        shown = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(shown) :]
