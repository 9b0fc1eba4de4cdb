"""Recognise llama2.c's ``.bin`` files, so that refusing them says what they are.

qconvert does not read them, but ``.bin`` is also the suffix of PyTorch pickles, and calling
a llama2.c checkpoint "a pickle" sends the user the wrong way. Layouts (karpathy/llama2.c):

- checkpoint, legacy (``export.py --version 0``): seven int32 ``dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, seq_len`` (a negative ``vocab_size`` means an unshared
  classifier), then the float32 weights, whose count the header fixes;
- checkpoint, versioned: the magic ``ak42`` (u32 0x616b3432), an int32 version, ... (256-byte header);
- tokenizer: int32 ``max_token_length``, then per token a float32 score, an int32 length and
  that many bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

MAGIC_V1 = 0x616B3432  # "ak42" as a little-endian u32
_MAX_TOKENS = 10_000_000


def _legacy_checkpoint(head: bytes, size: int) -> str | None:
    if len(head) < 28:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads or heads % kv_heads:
        return None
    head_size = dim // heads
    kv_dim = kv_heads * head_size
    n = (vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden)
         + dim + seq_len * head_size + (0 if shared else vocab * dim))
    if 28 + 4 * n != size:
        return None
    return (f"a llama2.c checkpoint (dim {dim}, {layers} layers, {heads} heads, {kv_heads} kv heads,"
            f" vocabulary {vocab}, context {seq_len})")


def _tokenizer(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:
        data = f.read(min(size, 64 << 20))
    if len(data) != size or size < 4:
        return None
    (max_len,) = struct.unpack_from("<i", data)
    if not 0 < max_len < 4096:
        return None
    pos, count = 4, 0
    while pos < size and count < _MAX_TOKENS:
        if pos + 8 > size:
            return None
        _score, n = struct.unpack_from("<fi", data, pos)
        if not 0 <= n <= max_len or pos + 8 + n > size:
            return None
        pos += 8 + n
        count += 1
    if pos != size or count == 0:
        return None
    return f"a llama2.c tokenizer ({count} tokens)"


def describe(path: Path) -> str | None:
    """"a llama2.c checkpoint (...)" / "a llama2.c tokenizer (...)", or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(28)
    except OSError:
        return None
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == MAGIC_V1:
        (version,) = struct.unpack_from("<i", head, 4)
        return f"a llama2.c checkpoint (format version {version})"
    return _legacy_checkpoint(head, size) or _tokenizer(path, size)


def refusal(path: Path) -> str | None:
    """The sentence refusing a llama2.c file, or None when ``path`` is not one."""
    what = describe(path)
    if what is None:
        return None
    return (f"{path.name} is {what}, which qconvert does not read; it reads Hugging Face safetensors folders,"
            " GGUF and ONNX (llama.cpp's llama-convert-llama2c-to-ggml turns a llama2.c model into GGUF)")
