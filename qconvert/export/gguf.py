"""Export a container to GGUF v3 that llama.cpp loads, without re-quantizing anything.

Every block type GGML has is stored with GGML's bytes (FORMAT.md §7), so a tensor is copied
as it is; q/k rows are put back into llama.cpp's pair-permuted RoPE order (a row permutation,
blocks move whole). Tensors whose type GGML lacks are refused, or converted to Q8_0 with
``allow_requant``. The llama hyper-parameters come from the HF config; the tokenizer from a
GGUF source's own metadata, or is rebuilt from tokenizer.json (byte-level BPE -> "gpt2",
SentencePiece-style BPE with byte fallback -> "llama").
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import by_name
from ..container import Container
from ..errors import QConvertError
from ..sources.gguf import permute_rows

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)

# llama_ftype for a file that is "mostly" one type, when the recipe names no mix
_FTYPE_OF_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
                  "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "BF16": 32}
# GGUF tokenizer token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------------------------
# the writer: a list of (key, type, value) and a list of tensors


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _scalar(vtype: int, value: Any) -> bytes:
    fmt = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", U64: "Q", I64: "q", F64: "d"}
    if vtype == BOOL:
        return struct.pack("<B", int(bool(value)))
    if vtype == STRING:
        return _string(value)
    return struct.pack("<" + fmt[vtype], value)


def _kv(key: str, vtype: int, value: Any, item_type: int | None = None) -> bytes:
    out = _string(key) + struct.pack("<I", vtype)
    if vtype == ARRAY:
        assert item_type is not None
        out += struct.pack("<IQ", item_type, len(value))
        if item_type == STRING:
            out += b"".join(_string(v) for v in value)
        elif item_type in (F32, I32, U32):
            out += np.asarray(value, dtype={F32: "<f4", I32: "<i4", U32: "<u4"}[item_type]).tobytes()
        else:
            out += b"".join(_scalar(item_type, v) for v in value)
        return out
    return out + _scalar(vtype, value)


def _infer_kv_type(value: Any) -> tuple[int, int | None]:
    """GGUF type for a value from a GGUF source's metadata (as our reader returned it)."""
    if isinstance(value, bool):
        return BOOL, None
    if isinstance(value, int):
        return (U32, None) if 0 <= value < 2**32 else (I64, None)
    if isinstance(value, float):
        return F32, None
    if isinstance(value, str):
        return STRING, None
    if isinstance(value, list):
        if not value or isinstance(value[0], str):
            return ARRAY, STRING
        if isinstance(value[0], bool):
            return ARRAY, BOOL
        if isinstance(value[0], int):
            return ARRAY, I32
        return ARRAY, F32
    raise QConvertError(f"cannot write metadata value of type {type(value).__name__} to GGUF")


_KINDS = {"u32": U32, "f32": F32, "bool": BOOL, "str": STRING}


def _arch_kv(arch, c: Container) -> list[tuple[str, int, Any, int | None]]:
    """The family's hyper-parameters under llama.cpp's keys (arch/<family>.py's GGUF table);
    a kind ``"<kind>[]"`` is an array of that kind (e.g. one bool per layer)."""
    out = []
    for key, kind, value in arch.kv_to_gguf(c.config):
        if kind.endswith("[]"):
            out.append((key, ARRAY, list(value), _KINDS[kind[:-2]]))
        else:
            out.append((key, _KINDS[kind], value, None))
    return out


def _tokenizer_kv(c: Container) -> list[tuple[str, int, Any, int | None]]:
    gguf_tok = c.metadata.get("tokenizer.gguf")
    if isinstance(gguf_tok, dict):
        out = []
        for key, value in gguf_tok.items():
            full = key if key.startswith("tokenizer.") else f"tokenizer.ggml.{key}"
            vtype, item = _infer_kv_type(value)
            if full.endswith("token_type"):
                item = I32
            if full.endswith("scores"):
                item = F32
            out.append((full, vtype, value, item))
        return out
    tok_json = c.metadata.get("tokenizer.json")
    if not isinstance(tok_json, str):
        raise QConvertError("the container carries no tokenizer; GGUF needs one")
    return _tokenizer_kv_from_hf(json.loads(tok_json), c)


def _tokenizer_kv_from_hf(tok: dict, c: Container) -> list[tuple[str, int, Any, int | None]]:
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise QConvertError(f"exporting a {model.get('type')!r} tokenizer to GGUF is not supported (BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [NORMAL] * n
    for text, t in added.items():
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    hf = c.metadata.get("hf") or {}
    tok_cfg = hf.get("tokenizer_config.json") or {}
    cfg = c.config

    def special_id(name: str, fallback: Any) -> int | None:
        text = tok_cfg.get(name)
        if isinstance(text, dict):
            text = text.get("content")
        if isinstance(text, str) and text in vocab:
            return vocab[text]
        return fallback if isinstance(fallback, int) else None

    out: list[tuple[str, int, Any, int | None]] = []
    if model.get("byte_fallback"):
        # SentencePiece converted to BPE: llama.cpp's SPM tokenizer merges by token score,
        # so a token made by merge r scores -r (earlier merges win, as in BPE).
        scores = [0.0] * n
        for rank, m in enumerate(merges):
            left, right = m.split(" ", 1)
            merged = vocab.get(left + right)
            if merged is not None and scores[merged] == 0.0:
                scores[merged] = -float(rank + 1)
        for text, i in vocab.items():
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = BYTE
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = UNKNOWN
        out += [("tokenizer.ggml.model", STRING, "llama", None),
                ("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
                ("tokenizer.ggml.scores", ARRAY, scores, F32),
                ("tokenizer.ggml.token_type", ARRAY, types, I32)]
        if unk in vocab:
            out.append(("tokenizer.ggml.unknown_token_id", U32, vocab[unk], None))
    else:
        out += [("tokenizer.ggml.model", STRING, "gpt2", None),
                ("tokenizer.ggml.pre", STRING, "default", None),
                ("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
                ("tokenizer.ggml.token_type", ARRAY, types, I32),
                ("tokenizer.ggml.merges", ARRAY, merges, STRING)]
    bos = special_id("bos_token", cfg.get("bos_token_id"))
    eos = special_id("eos_token", cfg.get("eos_token_id"))
    if bos is not None:
        out.append(("tokenizer.ggml.bos_token_id", U32, bos, None))
    if eos is not None:
        out.append(("tokenizer.ggml.eos_token_id", U32, eos, None))
    add_bos = tok_cfg.get("add_bos_token")
    if isinstance(add_bos, bool):
        out.append(("tokenizer.ggml.add_bos_token", BOOL, add_bos, None))
    template = tok_cfg.get("chat_template")
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", STRING, template, None))
    return out


def export_gguf(c: Container, output: str | Path, allow_requant: bool = False) -> dict:
    """Write ``c`` as GGUF v3 to ``output`` (atomically). Returns a summary."""
    from ..arch import by_name as arch_by_name

    if c.architecture == "onnx":
        raise QConvertError("this container holds an ONNX graph; export it with --to onnx")
    arch = arch_by_name(c.architecture)
    if arch.kind != "decoder":
        raise QConvertError(f"GGUF export supports decoder language models; this container is {c.architecture!r}")
    cfg = arch.parse_config(c.config)

    # (gguf name, [container names], type name, requant); merged expert tensors list several
    plan: list[tuple[str, list[str], str, bool]] = []
    index: dict[str, int] = {}
    type_counts: dict[str, int] = {}
    for name, info in c.tensors.items():
        bt = info.block_type
        requant = not bt.ggml
        if requant and not allow_requant:
            raise QConvertError(
                f"tensor {name} is {bt.name}, which GGML does not have; pass --allow-requant to convert such"
                " tensors to Q8_0 (a second rounding)"
            )
        type_name = "Q8_0" if requant else bt.name
        if requant and info.shape[-1] % 32:
            type_name = "F16"
        gname, expert = arch.gguf_name(name)
        if expert is not None and gname in index:
            entry = plan[index[gname]]
            if entry[2] != type_name or c.tensors[entry[1][0]].shape != info.shape:
                raise QConvertError(f"experts of {gname} differ in type or shape; llama.cpp stores them as one tensor")
            entry[1].append(name)
            continue
        index[gname] = len(plan)
        plan.append((gname, [name], type_name, requant))
        type_counts[type_name] = type_counts.get(type_name, 0) + 1
    for gname, names, _, _ in plan:  # a merged tensor holds experts 0..n-1 in order ("10" sorts before "2")
        if arch.gguf_name(names[0])[1] is not None:
            names.sort(key=lambda n: arch.gguf_name(n)[1])
            if [arch.gguf_name(n)[1] for n in names] != list(range(len(names))):
                raise QConvertError(f"{gname}: the container lacks some experts; llama.cpp stores them all in one tensor")
    extra = {}  # llama.cpp tensors derived from the config (Llama 3's rope_freqs)
    freqs = arch.rope_freqs(cfg) if arch.rope_freqs is not None else None
    if freqs is not None:
        extra["rope_freqs.weight"] = np.asarray(freqs, "<f4")

    recipe = c.recipe
    from ..methods.mixes import MIXES

    mix = MIXES.get(recipe.get("mix") or "")
    if mix is not None:
        ftype = mix.ftype
    else:
        quantized = {t: n for t, n in type_counts.items() if t not in ("F32",)}
        main = max(quantized, key=quantized.get) if quantized else "F32"
        ftype = _FTYPE_OF_TYPE.get(main, 1024)  # 1024 = LLAMA_FTYPE_GUESSED

    kvs: list[tuple[str, int, Any, int | None]] = [
        ("general.architecture", STRING, arch.gguf_arch, None),
        ("general.name", STRING, str(c.source.get("id") or Path(c.path).stem), None),
        ("general.file_type", U32, ftype, None),
        ("general.quantization_version", U32, 2, None),
        ("general.quantized_by", STRING, f"qconvert {c.metadata.get('qconvert.version')}", None),
    ]
    kvs += _arch_kv(arch, c)
    kvs += _tokenizer_kv(c)

    def shape_of(names: list[str]) -> tuple[int, ...]:
        shape = c.tensors[names[0]].shape
        return (len(names), *shape) if len(names) > 1 or arch.gguf_name(names[0])[1] is not None else shape

    entries = [(g, shape_of(names), type_name) for g, names, type_name, _ in plan]
    entries += [(g, v.shape, "F32") for g, v in extra.items()]
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(entries), len(kvs)))
    for key, vtype, value, item in kvs:
        header += _kv(key, vtype, value, item)
    offset = 0
    sizes = []
    for gname, shape, type_name in entries:
        nb = by_name(type_name).nbytes(shape)
        header += _string(gname) + struct.pack("<I", len(shape))
        header += struct.pack(f"<{len(shape)}Q", *reversed(shape))
        header += struct.pack("<iQ", by_name(type_name).id, offset)
        sizes.append(nb)
        offset += (nb + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    header += b"\0" * (-len(header) % ALIGNMENT)

    def tensor_bytes(gname: str, name: str, type_name: str, requant: bool) -> np.ndarray:
        info = c.tensors[name]
        raw = c.raw(name)
        role = arch.role(name)
        if requant:
            raw = by_name(type_name).quantize(c.tensor(name).reshape(-1, info.shape[-1]))
        offset = arch.gguf_value_offset.get(role)
        if offset:
            if info.block_type.name != "F32":
                raise QConvertError(f"tensor {name} must be F32 to be written as llama.cpp's (1 + w)")
            raw = (c.tensor(name).astype("<f4") + np.float32(offset)).view(np.uint8)
        if arch.gguf_permute_qk and role in ("attn_q", "attn_k", "attn_q_bias", "attn_k_bias"):
            n_head = cfg.n_heads if role.startswith("attn_q") else cfg.n_kv_heads
            raw = raw.reshape(info.shape[0], -1)[permute_rows(info.shape[0], n_head)]
        return np.ascontiguousarray(raw).reshape(-1)

    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for (gname, names, type_name, requant), nb in zip(plan, sizes):
                written = 0
                for name in names:
                    data = tensor_bytes(gname, name, type_name, requant)
                    f.write(data.tobytes())
                    written += data.size
                assert written == nb
                f.write(b"\0" * (-nb % ALIGNMENT))
            for (gname, values), nb in zip(extra.items(), sizes[len(plan):]):
                f.write(values.tobytes())
                f.write(b"\0" * (-nb % ALIGNMENT))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(output), "tensors": len(entries), "types": type_counts, "file_type": ftype,
            "requantized": [n for p in plan if p[3] for n in p[1]], "file_bytes": output.stat().st_size}
