"""A seeded mutation fuzzer for everything qconvert reads (issue #14 C).

    python -m tests.fuzz_harness                       # the full run of RELIABILITY.md
    python -m tests.fuzz_harness --cases hf=200,onnx=100 --seed 3
    python -m tests.fuzz_harness --sigkill 20          # kill `quantize` at 20 random moments

Kinds of input, each case one seeded mutation of a valid seed file:

- ``container-stale``: bytes of a container changed anywhere, checksums left stale;
- ``container-crc``: the header changed (bytes, or entries rewritten: hostile JSON, dims, type
  ids, offsets, params ...) and every checksum recomputed, so the change reaches the parser;
- ``gguf``: a GGUF changed at the byte level or field by field (counts, lengths, value types,
  dims, offsets, floats);
- ``hf``: a Hugging Face folder with one file changed: the safetensors header (bytes or
  JSON), ``config.json`` (only what a JSON loader must refuse), ``tokenizer.json`` or an
  auxiliary JSON file;
- ``hf-config``: ``config.json`` given valid JSON of hostile meaning (a string for a head
  count, a dict for a size, 0, -1, 2^64 ...): the model-config validation's job (issue #14 B.6);
- ``onnx``: an ONNX model changed through its protobuf (dims, data types, data lengths,
  external data, ops, attributes, input shapes, opsets) or its serialized bytes.

What each case runs: a container is opened, summarised as ``inspect --json --verify`` does,
every tensor decoded, its tokenizer built and run, and (ONNX) its graph checked and exported;
the other kinds are quantized by ``qconvert.quantize`` and the output, if any, must verify.

A case's outcome is ``ok`` (it worked), ``refused`` (a :class:`QConvertError`, the one error
type a user should ever see) or a bug: any other exception, a hang (over 2 s in Python, or a
worker silent for 60 s), a crash (the worker process died). Workers run in subprocesses of
``CHUNK`` cases each, so a crash loses one case, and report their peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"

KINDS = ("container-stale", "container-crc", "gguf", "hf", "hf-config", "onnx")
FULL_RUN = {"container-stale": 50_000, "container-crc": 50_000, "gguf": 10_000, "hf": 10_000, "hf-config": 2_000,
            "onnx": 10_000}
# The in-suite subset (tests/test_fuzz.py): a minute or two on two cores. hf-config is left out
# until qconvert/arch validates model configs (issue #14 B.6); RELIABILITY.md reports it.
SUITE_RUN = {"container-stale": 800, "container-crc": 1_500, "gguf": 400, "hf": 400, "onnx": 400}
CASE_LIMIT_S = 2.0  # a case running longer in Python is a hang
WATCHDOG_S = 60.0  # a worker silent this long is killed (a hang in native code)
CHUNK = 5_000

# -------------------------------------------------------------------------------- seeds


def build_seeds(work: Path) -> dict[str, list[Path]]:
    """Valid inputs of every kind (deterministic: every worker builds the same ones)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    import qconvert
    from qconvert.container import open_container
    from tests.conftest import make_hf_folder

    seeds: dict[str, list[Path]] = {"container": [], "gguf": [], "hf": [], "onnx": []}
    seeds["container"] += sorted((REPO / "formats").glob("v*/*.q")) + [REPO / "spec" / "example.q"]

    hf = work / "hf"
    if STORIES.is_dir():
        shutil.copytree(STORIES, hf, ignore=shutil.ignore_patterns("original"))
    else:
        make_hf_folder(hf)
    seeds["hf"].append(hf)
    q8 = work / "hf-q8.q"
    qconvert.quantize(hf, q8, method="rtn", bits=8)
    seeds["container"].append(q8)

    gguf_path = work / "model.gguf"
    if STORIES.is_dir():
        from qconvert.export.gguf import export_gguf

        with open_container(q8) as c:
            export_gguf(c, gguf_path)
        seeds["gguf"].append(gguf_path)
        from_gguf = work / "gguf-q4k.q"
        qconvert.quantize(gguf_path, from_gguf, method="q4_k_m", allow_requantize=True)  # tokenizer.gguf, K-quants
        seeds["container"].append(from_gguf)
        nf4 = work / "hf-nf4.q"
        qconvert.quantize(hf, nf4, method="nf4")  # NF4_DQ params
        seeds["container"].append(nf4)
    else:
        try:
            from tests.test_source_gguf import write_tiny_llama

            write_tiny_llama(gguf_path)
            data = gguf_path.read_bytes().replace(b"tokenizer.huggingface.json", b"tokenizer.huggingface.jsoX")
            gguf_path.write_bytes(data)
            seeds["gguf"].append(gguf_path)
        except Exception:  # gguf-py (a test dependency) missing: no GGUF seed
            pass

    try:
        import onnx

        from tests.test_onnx import tiny_model

        onnx_path = work / "tiny.onnx"
        onnx.save(tiny_model(), str(onnx_path))
        seeds["onnx"].append(onnx_path)
        (work / "calib").mkdir()
        np.save(work / "calib" / "0.npy", np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32))
        onnx_q = work / "onnx-w8a8.q"
        qconvert.quantize(onnx_path, onnx_q, calib=work / "calib")
        seeds["container"].append(onnx_q)
    except ImportError:
        pass
    return seeds


# -------------------------------------------------------------------------------- mutators

INTERESTING_INTS = [0, 1, 2, 7, 8, 16, 31, 32, 63, 64, 127, 128, 255, 256, 4095, 65535, 65536, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
HOSTILE_JSON = ["null", "true", "-1", "0", "18446744073709551616", "-9223372036854775809", "1e308", "1e999",
                "NaN", "Infinity", "-Infinity", '"x"', '""', "[]", "{}", "[[[[]]]]", '"\\u0000"', "[" * 200 + "]" * 200,
                "[" * 5000 + "]" * 5000, '{"a": 1, "a": 2}', "[" + ",".join(["0"] * 1000) + "]", "1" * 5000, '"\\ud800"',
                '{"input_perm": [0, 0, 1]}', '{"dq_offset": "x", "dq_absmax2": [1e999], "dq_block": 256}',
                '{"row_scales": [-1], "act_scale": 0}', '{"future": 1}', "\"" + "a" * 10000 + "\""]


def mutate_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, ops: int | None = None) -> bytes:
    """One to four byte-level changes inside ``data[lo:hi]``."""
    buf = bytearray(data)
    for _ in range(ops or rng.randint(1, 4)):
        end = len(buf) if hi is None else min(hi, len(buf))
        if end <= lo:
            buf += bytes([rng.randrange(256)])
            continue
        pos = rng.randrange(lo, end)
        op = rng.randrange(8)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x5B, 0x7B])
        elif op == 2:
            width = rng.choice([2, 4, 8])
            value = rng.choice(INTERESTING_INTS + [rng.randrange(2**16)]) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, "little")[: max(0, len(buf) - pos)]
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4:
            del buf[pos : pos + rng.randint(1, 64)]
        elif op == 5:
            n = rng.randint(1, 64)
            buf[pos:pos] = buf[pos : pos + n]
        elif op == 6:
            del buf[pos:]
        else:
            buf[pos] = rng.randrange(256)
    return bytes(buf)


def _json_paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in list(value.items())[:200]:
            out += _json_paths(v, path + (k,))
    elif isinstance(value, list):
        for i in sorted(random.Random(len(value)).sample(range(len(value)), min(len(value), 20))):
            out += _json_paths(value[i], path + (i,))
    return out


SYNTAX_ONLY = ["NaN", "Infinity", "-Infinity", "1e999", "[" * 5000 + "]" * 5000, "1" * 5000]


def mutate_json(text: bytes, rng: random.Random, values: bool = True) -> bytes:
    """A JSON-aware change: a value replaced by a hostile one, a key dropped or repeated, the
    text cut or given a bad byte; falls back to bytes when the text is not JSON.
    ``values=False``: only what no JSON parser may accept (the loader's job), no valid JSON of
    unexpected meaning (the job of whoever interprets it)."""
    try:
        doc = json.loads(text)
    except Exception:
        return mutate_bytes(text, rng)
    op = rng.randrange(10) if values else rng.choice([1, 2, 4, 5, 5, 5])
    if op == 0:
        return mutate_bytes(text, rng)
    if op == 1:  # invalid UTF-8 somewhere
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + bytes([rng.choice([0xFF, 0xC3, 0xED])]) + text[pos:]
    if op == 2:
        return text[: rng.randrange(len(text) + 1)]
    paths = _json_paths(doc)
    path = rng.choice(paths)
    marker = "\u2603QCONVERT_FUZZ\u2603"
    if not path:
        return rng.choice(HOSTILE_JSON).encode()
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == 3 and isinstance(parent, dict):
        del parent[key]
        return json.dumps(doc).encode()
    if op == 4 and not values and not isinstance(parent, dict):
        op = 5
    if op == 4 and isinstance(parent, dict):  # the key twice
        parent[key] = marker
        out = json.dumps(doc, ensure_ascii=False)
        return out.replace(json.dumps(marker, ensure_ascii=False), '1, ' + json.dumps(str(key)) + ': 2', 1).encode()
    parent[key] = marker
    out = json.dumps(doc, ensure_ascii=False)
    return out.replace(json.dumps(marker, ensure_ascii=False), rng.choice(HOSTILE_JSON if values else SYNTAX_ONLY), 1).encode()


# ---- containers

FIXED = struct.Struct("<4sHHIIQQQQ")
PREAMBLE_KEY = b"qconvert.preamble_crc32"


def parse_container(data: bytes) -> tuple[list, list, tuple] | None:
    """(metadata entries, tensor entries, fixed header fields) of a well-formed container."""
    try:
        fields = FIXED.unpack_from(data)
        _, _, _, _, _, n_kv, n_t, header_len, _ = fields
        if n_kv > 65_536 or n_t > 100_000 or 48 + header_len > len(data):
            return None
        pos, kvs, tensors = 48, [], []
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<H", data, pos)
            key = data[pos + 2 : pos + 2 + klen]
            vtype, vlen = struct.unpack_from("<BQ", data, pos + 2 + klen)
            start = pos + 2 + klen + 9
            kvs.append([key, vtype, data[start : start + vlen]])
            pos = start + vlen
        for _ in range(n_t):
            (nlen,) = struct.unpack_from("<H", data, pos)
            name = data[pos + 2 : pos + 2 + nlen]
            pos += 2 + nlen
            (nd,) = struct.unpack_from("<B", data, pos)
            dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 1))
            pos += 1 + 8 * nd
            type_id, off, nbytes, crc, plen = struct.unpack_from("<HQQII", data, pos)
            pos += 26
            tensors.append([name, dims, type_id, off, nbytes, crc, data[pos : pos + plen]])
            pos += plen
        if pos != 48 + header_len:
            return None
        return kvs, tensors, fields
    except (struct.error, ValueError, OverflowError):
        return None


def build_container(kvs: list, tensors: list, fields: tuple, data_section: bytes) -> bytes:
    magic, major, minor, al, _crc, _, _, _, _ = fields
    header = b""
    for key, vtype, value in kvs:
        header += struct.pack("<H", len(key) % 65536) + key + struct.pack("<BQ", vtype % 256, len(value)) + value
    for name, dims, type_id, off, nbytes, crc, params in tensors:
        header += struct.pack("<H", len(name) % 65536) + name + struct.pack("<B", len(dims) % 256)
        header += b"".join(struct.pack("<Q", d % 2**64) for d in dims)
        header += struct.pack("<HQQII", type_id % 65536, off % 2**64, nbytes % 2**64, crc, len(params)) + params
    al = al if al and al & (al - 1) == 0 and al <= 65536 else 64
    data_offset = -(-(48 + len(header)) // al) * al
    out = FIXED.pack(magic, major, minor, al, 0, len(kvs), len(tensors), len(header), data_offset)
    return fix_crcs(out + header + bytes(data_offset - 48 - len(header)) + data_section)


def fix_crcs(data: bytes) -> bytes:
    """Recompute the tensor, preamble and header checksums of a (changed) container, as far as
    its fields allow: the change then reaches the parser instead of failing a checksum."""
    if len(data) < 48:
        return data
    buf = bytearray(data)
    header_len, data_offset = FIXED.unpack_from(buf)[7:9]
    end = 48 + header_len
    if end > len(buf):
        return bytes(buf)
    parsed = parse_container(bytes(buf))
    if parsed is not None:  # tensor checksums, in place
        pos = 48
        kvs, tensors, _ = parsed
        for key, _, value in kvs:
            pos += 2 + len(key) + 9 + len(value)
        for name, dims, _t, off, nbytes, _c, params in tensors:
            pos += 2 + len(name) + 1 + 8 * len(dims) + 2 + 8 + 8
            start = data_offset + off
            if start + nbytes <= len(buf):
                struct.pack_into("<I", buf, pos, zlib.crc32(buf[start : start + nbytes]))
            pos += 4 + 4 + len(params)
    at = buf.find(struct.pack("<H", len(PREAMBLE_KEY)) + PREAMBLE_KEY + struct.pack("<BQ", 1, 8), 48, end)
    if at >= 0:
        struct.pack_into("<Q", buf, at + 2 + len(PREAMBLE_KEY) + 9, zlib.crc32(buf[16:48], zlib.crc32(buf[0:12])))
    struct.pack_into("<I", buf, 12, zlib.crc32(buf[48:end]))
    return bytes(buf)


def mutate_container_entries(data: bytes, rng: random.Random) -> bytes:
    parsed = parse_container(data)
    if parsed is None:
        return fix_crcs(mutate_bytes(data, rng, 0, 48 + 512))
    kvs, tensors, fields = parsed
    data_section = data[fields[8]:]
    op = rng.randrange(12)
    if op <= 3 and kvs:  # a metadata value
        kv = rng.choice(kvs)
        if op == 0:
            kv[2] = rng.choice(HOSTILE_JSON).encode()
            kv[1] = rng.choice([7, 7, 7, 5, 6, 3, 4, 1])
        elif op == 1 and kv[1] == 7:
            kv[2] = mutate_json(kv[2], rng)
        elif op == 2:
            kv[1] = rng.randrange(256)
        else:
            kv[2] = mutate_bytes(kv[2], rng) if kv[2] else b"\xff"
    elif op == 4 and kvs:
        kv = rng.choice(kvs)
        kv[0] = rng.choice([b"", kv[0] + b"\xff", kvs[0][0], b"model.config", b"recipe", b"onnx.graph", PREAMBLE_KEY])
    elif op == 5:
        kvs.append([rng.choice([b"model.config", b"source", b"x.y", b"tokenizer.json", b"hf", b"onnx.weights"]),
                    rng.choice([1, 2, 3, 4, 5, 6, 7]), rng.choice(HOSTILE_JSON).encode()])
    elif tensors:
        t = rng.choice(tensors)
        if op == 6:
            i = rng.randrange(len(t[1]) + 1)
            choice = rng.randrange(4)
            if choice == 0 and t[1]:
                t[1][min(i, len(t[1]) - 1)] = rng.choice(INTERESTING_INTS)
            elif choice == 1:
                t[1].insert(i, rng.choice(INTERESTING_INTS))
            elif choice == 2 and t[1]:
                del t[1][min(i, len(t[1]) - 1)]
            else:
                t[1] = [rng.choice([2**32, 2**33, 2**63]), rng.choice([2**32, 2**31, 2]), t[1][-1] if t[1] else 32]
        elif op == 7:
            t[2] = rng.choice([0, 1, 2, 3, 8, 12, 14, 15, 30, 256, 257, 321, 400, 999, 65535])
        elif op == 8:
            other = rng.choice(tensors)
            t[3] = rng.choice([other[3], 0, 64, 2**63, 2**64 - 64, t[3] + 64])
        elif op == 9:
            t[4] = rng.choice(INTERESTING_INTS + [t[4] + 1, t[4] - 1, t[4] * 2])
        elif op == 10:
            t[6] = rng.choice(HOSTILE_JSON + ['{"input_perm": ' + json.dumps(list(range(rng.choice([32, 64, 256])))[::-1]) + "}"]).encode()
        else:
            if rng.random() < 0.5:
                tensors.append(list(t))
            else:
                tensors.remove(t)
    return build_container(kvs, tensors, fields, data_section)


def mutate_container(data: bytes, rng: random.Random, recompute: bool) -> bytes:
    if not recompute:
        return mutate_bytes(data, rng)
    if rng.random() < 0.5:
        return mutate_container_entries(data, rng)
    header_end = 48 + FIXED.unpack_from(data)[7]
    return fix_crcs(mutate_bytes(data, rng, 0, header_end if rng.random() < 0.9 else None))


# ---- GGUF


def gguf_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every count, length, type, dim, offset and scalar of a GGUF header,
    and where the header ends."""
    fields: list[tuple[int, int]] = []
    pos = 4

    def take(width: int) -> int:
        nonlocal pos
        (value,) = struct.unpack_from({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width], data, pos)
        fields.append((pos, width))
        pos += width
        return value

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    try:
        take(4)
        n_t, n_kv = take(8), take(8)
        for _ in range(min(n_kv, 10_000)):
            pos += take(8)
            vtype = take(4)
            if vtype == 8:
                pos += take(8)
            elif vtype == 9:
                etype, count = take(4), take(8)
                if etype == 8:
                    for i in range(min(count, 1_000_000)):
                        if i < 4:  # the first lengths are mutation targets; the rest are skipped
                            n = take(8)
                        else:
                            (n,) = struct.unpack_from("<Q", data, pos)
                            pos += 8
                        pos += n
                else:
                    for i in range(min(count, 4)):
                        take(sizes.get(etype, 1))
                    pos += max(0, count - 4) * sizes.get(etype, 1)
            else:
                take(sizes.get(vtype, 1))
        for _ in range(min(n_t, 10_000)):
            pos += take(8)
            nd = take(4)
            for _ in range(min(nd, 8)):
                take(8)
            take(4)
            take(8)
    except (struct.error, KeyError):
        pass
    return fields, pos


def mutate_gguf(data: bytes, rng: random.Random) -> bytes:
    fields, header_end = gguf_fields(data)
    op = rng.randrange(10)
    if op < 5 and fields:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 2)):
            pos, width = rng.choice(fields)
            if width == 4 and rng.random() < 0.3:  # a float32 or a value type
                value = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf, 1e38])) if rng.random() < 0.5 else \
                    rng.choice([0, 1, 6, 8, 9, 12, 13, 2**31 - 1, 2**32 - 1]).to_bytes(4, "little")
            else:
                old = int.from_bytes(buf[pos : pos + width], "little")
                value = (rng.choice(INTERESTING_INTS + [old + 1, old - 1, old * 2, old + 32]) % (1 << 8 * width)).to_bytes(width, "little")
            buf[pos : pos + width] = value
        return bytes(buf)
    if op < 9:
        return mutate_bytes(data, rng, 0, header_end)
    return mutate_bytes(data, rng)


# ---- Hugging Face folders


def mutate_hf(folder: Path, rng: random.Random, config_values: bool = False) -> None:
    """One file of the folder changed. ``config_values``: config.json may get valid JSON of
    hostile meaning (num_attention_heads "x", 0 layers ...), which the model-config validation
    (issue #14 B.6, qconvert/arch) refuses; without it config.json gets only what the JSON
    loader must refuse."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    if config_values:
        target = "config.json"
    else:
        target = rng.choices(["model.safetensors", "config.json", "tokenizer.json", "aux", "new"], [40, 25, 20, 10, 5])[0]
    if target == "model.safetensors":
        p = files["model.safetensors"]
        data = p.read_bytes()
        (n,) = struct.unpack_from("<Q", data)
        op = rng.randrange(10)
        if op < 5:
            header = mutate_json(data[8 : 8 + n], rng)
            data = struct.pack("<Q", len(header)) + header + data[8 + n :]
        elif op < 9:
            data = mutate_bytes(data, rng, 0, 8 + n)
        else:
            data = mutate_bytes(data, rng)
        p.write_bytes(data)
    elif target == "aux":
        names = [n for n in files if n.endswith(".json") and n not in ("config.json", "tokenizer.json")]
        if names:
            p = files[rng.choice(names)]
            p.write_bytes(mutate_json(p.read_bytes(), rng))
    elif target == "new":
        name = rng.choice(["model.safetensors.index.json", "quantize_config.json", "tokenizer_config.json"])
        (folder / name).write_bytes(rng.choice(HOSTILE_JSON + ['{"weight_map": {"a": "../../etc/passwd"}}',
                                                               '{"weight_map": {"lm_head.weight": "model.safetensors"}}',
                                                               '{"bits": 4, "group_size": 128, "desc_act": true}']).encode())
    elif target in files:
        p = files[target]
        p.write_bytes(mutate_json(p.read_bytes(), rng, values=config_values or target != "config.json"))


# ---- ONNX


def mutate_onnx(data: bytes, rng: random.Random) -> bytes:
    import onnx

    if rng.random() < 0.15:
        return mutate_bytes(data, rng)
    m = onnx.load_from_string(data)
    g = m.graph
    consts = [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    tensors = list(g.initializer) + consts
    op = rng.randrange(12)
    if op <= 5 and tensors:
        t = rng.choice(tensors)
        if op == 0:
            if t.dims and rng.random() < 0.7:
                t.dims[rng.randrange(len(t.dims))] = rng.choice([-1, -40, 0, 1, 3, 2**31, 2**40, 2**62])
            else:
                t.dims.append(rng.choice([1, 2, 0, -1]))
        elif op == 1:
            t.data_type = rng.choice([0, 1, 2, 6, 7, 10, 11, 16, 21, 22, 99])
        elif op == 2:
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)] if rng.random() < 0.7 else t.raw_data + b"\0" * 4
        elif op == 3:
            vals = list(onnx.numpy_helper.to_array(t).reshape(-1)[:10]) if t.data_type == 1 else [1.0]
            t.ClearField("raw_data")
            t.float_data.extend(float(v) for v in vals)
        elif op == 4:
            t.data_location = onnx.TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", rng.choice(["/etc/passwd", "../../x.bin", "missing.bin", "qconvert-container", ""])
        else:
            t.name = rng.choice(["", "x", g.node[0].output[0] if g.node else "y"])
    elif op == 6 and g.node:
        n = rng.choice(g.node)
        n.op_type = rng.choice(["MatMul", "Gemm", "Conv", "Relu", "Constant", "NoSuchOp", "QuantizeLinear"])
    elif op == 7 and g.node:
        n = rng.choice(g.node)
        if n.input and rng.random() < 0.5:
            n.input[rng.randrange(len(n.input))] = rng.choice(["", "x", "missing", n.output[0] if n.output else "z"])
        elif n.attribute:
            a = rng.choice(n.attribute)
            if a.type == a.INT:
                a.i = rng.choice([-1, 0, 1, 2, 2**40])
            elif a.type == a.INTS and a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 100, 2**40])
    elif op == 8:
        vi = rng.choice(list(g.input) + list(g.output))
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            d.Clear()
            d.dim_value = rng.choice([-1, 0, 1, 3, 8, 2**40])
        else:
            vi.type.tensor_type.elem_type = rng.choice([0, 1, 7, 10, 99])
    elif op == 9:
        if m.opset_import:
            m.opset_import[0].version = rng.choice([1, 7, 9, 10, 13, 21, 30, 99])
    elif op == 10:
        m.ir_version = rng.choice([0, 3, 4, 7, 10, 99])
    elif rng.random() < 0.2:
        g.ClearField("node")
    else:
        g.node.append(onnx.helper.make_node("MatMul", ["y", "g1_w"], ["z"]))
    return m.SerializeToString()


# -------------------------------------------------------------------------------- targets


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise CaseTimeout()


def run_container(path: Path, scratch: Path) -> None:
    from qconvert.container import open_container
    from qconvert.errors import QConvertError
    from qconvert.runtime.tokenizer import PROBE_TEXT, Tokenizer
    from qconvert.summary import summarize

    with open_container(path) as c:
        info = summarize(c, verify=True)
        if c.architecture == "onnx":
            from qconvert.onnx import onnx_summary

            info["onnx"] = onnx_summary(c)
        json.dumps(info, allow_nan=False)
        errors: list[QConvertError] = []
        for name in c.tensors:
            try:
                c.tensor(name)
            except QConvertError as e:
                errors.append(e)
        try:
            tok = Tokenizer.from_metadata(c.metadata)
            if tok is not None:
                tok.decode(tok.encode(PROBE_TEXT))
        except QConvertError as e:
            errors.append(e)
        if c.architecture == "onnx":
            from qconvert.onnx.export import export_qdq
            from qconvert.onnx.runner import build_run_model

            try:
                build_run_model(c, engine="reference")
                export_qdq(c, scratch / "export" / "m.onnx")
            except QConvertError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def run_quantize(path: Path, scratch: Path) -> None:
    import qconvert
    from qconvert.container import open_container

    out = scratch / "out" / "m.q"
    qconvert.quantize(path, out, method="rtn", bits=8, allow_requantize=True)
    with open_container(out) as c:  # what qconvert wrote must read back
        assert c.verify() == [], "qconvert wrote a container that fails its own checksums"
        for name in c.tensors:
            c.tensor(name)


# -------------------------------------------------------------------------------- worker


def make_case(kind: str, seeds: dict[str, list[Path]], rng: random.Random, scratch: Path) -> Path | None:
    if kind.startswith("container"):
        seed = rng.choice(seeds["container"])
        path = scratch / "case.q"
        path.write_bytes(mutate_container(seed.read_bytes(), rng, recompute=kind == "container-crc"))
        return path
    if not seeds[kind.split("-")[0]]:
        return None
    seed = rng.choice(seeds[kind.split("-")[0]])
    if kind.startswith("hf"):
        folder = scratch / "hf"
        shutil.copytree(seed, folder)
        mutate_hf(folder, rng, config_values=kind == "hf-config")
        return folder
    path = scratch / seed.name
    path.write_bytes((mutate_gguf if kind == "gguf" else mutate_onnx)(seed.read_bytes(), rng))
    return path


def peak_rss_kib() -> int:
    """This process's peak RSS. /proc's VmHWM, not getrusage: Linux carries ru_maxrss across
    exec, so a worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(kind: str, start: int, count: int, seed: int) -> None:
    """Run cases start .. start+count-1 of one kind; one JSON line per case on stdout."""
    from qconvert.errors import QConvertError

    base = Path(tempfile.mkdtemp(prefix="qconvert-fuzz-"))
    try:
        seeds = build_seeds(base / "seeds")
        signal.signal(signal.SIGALRM, _on_alarm)
        target: Callable[[Path, Path], None] = run_container if kind.startswith("container") else run_quantize
        print(json.dumps({"ready": True}), flush=True)
        for i in range(start, start + count):
            rng = random.Random(f"{seed}:{kind}:{i}")
            scratch = base / f"case-{i}"
            scratch.mkdir()
            record: dict[str, Any] = {"i": i}
            t0 = time.perf_counter()
            try:
                path = make_case(kind, seeds, rng, scratch)
            except Exception as e:  # a bug of this harness, not of qconvert
                path = None
                record["harness_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            try:
                if path is None:
                    record["outcome"] = "skipped"
                else:
                    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
                    try:
                        target(path, scratch)
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    record["outcome"] = "ok"
            except QConvertError as e:
                record["outcome"] = "refused"
                record["message"] = str(e)[:300]
            except CaseTimeout:
                record["outcome"] = "hang"
            except BaseException as e:  # noqa: BLE001 - every other exception is a finding
                if isinstance(e, KeyboardInterrupt):
                    raise
                tb = traceback.extract_tb(e.__traceback__)
                where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "qconvert" in f.filename), "?")
                record["outcome"] = "bug"
                record["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                record["where"] = where
            record["s"] = round(time.perf_counter() - t0, 4)
            shutil.rmtree(scratch, ignore_errors=True)
            print(json.dumps(record), flush=True)
        print(json.dumps({"done": True, "peak_rss_mib": round(peak_rss_kib() / 1024, 1)}), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def replay(kind: str, i: int, seed: int = 0, keep: Path | None = None) -> None:
    """Run one case in this process and let any exception propagate (for debugging)."""
    base = Path(tempfile.mkdtemp(prefix="qconvert-replay-"))
    seeds = build_seeds(base / "seeds")
    scratch = base / f"case-{i}"
    scratch.mkdir()
    path = make_case(kind, seeds, random.Random(f"{seed}:{kind}:{i}"), scratch)
    print(f"case {kind} {i}: {path}", file=sys.stderr)
    (run_container if kind.startswith("container") else run_quantize)(path, scratch)


# -------------------------------------------------------------------------------- parent


def run(cases: dict[str, int], seed: int = 0, chunk: int = CHUNK, log: Callable[[str], None] | None = None) -> dict:
    """Run the cases in worker subprocesses; the summary RELIABILITY.md reports."""
    summary: dict[str, Any] = {"seed": seed, "kinds": {}}
    started = time.time()
    for kind, total in cases.items():
        k = {"cases": 0, "ok": 0, "refused": 0, "skipped": 0, "bugs": [], "hangs": [], "crashes": [],
             "slowest_s": 0.0, "peak_rss_mib": 0.0, "seconds": 0.0, "distinct_refusals": set()}
        t_kind = time.time()
        next_case = 0
        while next_case < total:
            n = min(chunk, total - next_case)
            cmd = [sys.executable, "-m", "tests.fuzz_harness", "--worker", kind, str(next_case), str(n), str(seed)]
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
            expected = next_case
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            finished = started_cases = False
            while True:
                ready = sel.select(timeout=WATCHDOG_S if started_cases else 600)  # seeds take a few s
                if not ready:  # silent too long: a hang below Python
                    proc.kill()
                    k["hangs"].append({"i": expected, "note": f"worker silent for {WATCHDOG_S:.0f} s"})
                    break
                line = proc.stdout.readline()
                if not line:
                    break
                rec = json.loads(line)
                if rec.get("ready"):
                    started_cases = True
                    continue
                if rec.get("done"):
                    k["peak_rss_mib"] = max(k["peak_rss_mib"], rec["peak_rss_mib"])
                    finished = True
                    continue
                expected = rec["i"] + 1
                k["cases"] += 1
                k["slowest_s"] = max(k["slowest_s"], rec["s"])
                outcome = rec["outcome"]
                if outcome == "hang" or rec["s"] > CASE_LIMIT_S:
                    k["hangs"].append(rec)
                    if log:
                        log(f"  HANG {kind} case {rec['i']}: {outcome} after {rec['s']} s")
                elif outcome in ("ok", "refused", "skipped"):
                    k[outcome] += 1
                    if "harness_error" in rec and log:
                        log(f"  harness error, {kind} case {rec['i']}: {rec['harness_error']}")
                    if outcome == "refused":
                        k["distinct_refusals"].add(rec["message"][:50])
                else:
                    k["bugs"].append(rec)
                if outcome == "bug" and log:
                    log(f"  BUG {kind} case {rec['i']}: {rec['error']} at {rec['where']}")
            proc.wait()
            if not finished and expected < next_case + n:
                if proc.returncode not in (0, None) and not any(h.get("i") == expected for h in k["hangs"]):
                    k["crashes"].append({"i": expected, "returncode": proc.returncode})
                    if log:
                        log(f"  CRASH {kind} case {expected}: worker exit {proc.returncode}")
                next_case = expected + 1  # skip the case that killed the worker
            else:
                next_case += n
            if log:
                log(f"{kind}: {k['cases']}/{total} cases, {len(k['bugs'])} bugs, {time.time() - t_kind:.0f} s")
        k["seconds"] = round(time.time() - t_kind, 1)
        k["distinct_refusals"] = len(k["distinct_refusals"])
        k["cases_per_s"] = round(k["cases"] / k["seconds"], 1) if k["seconds"] else None
        summary["kinds"][kind] = k
    summary["seconds"] = round(time.time() - started, 1)
    return summary


# -------------------------------------------------------------------------------- SIGKILL


def _writes_into(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` has a file of ``folder`` open (a nameless one shows as
    ``folder/#123 (deleted)``)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder) + os.sep):
                return True
        except OSError:
            pass
    return False


def sigkill_test(moments: int = 20, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Kill ``qconvert quantize`` with SIGKILL at ``moments`` random moments of its run; after
    each, the output folder must hold exactly what it held before (a previous output intact,
    or a complete new one) and nothing else."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_hf_folder, tiny_llama_config, tiny_llama_tensors

    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="qconvert-sigkill-"))
    try:
        dims = dict(hidden=256, inter=768, layers=24, vocab=2048, heads=8, kv_heads=4)  # a writing phase of ~0.5 s
        folder = make_hf_folder(base / "hf", tensors=tiny_llama_tensors(**dims))
        (folder / "config.json").write_text(json.dumps(tiny_llama_config(**dims)))
        out_dir = base / "out"
        out_dir.mkdir()
        out = out_dir / "m.q"
        previous = b"previous output"
        cmd = [sys.executable, "-m", "qconvert", "quantize", str(folder), "-o", str(out), "--method", "q4_k_m", "-q", "--force"]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # an uninterrupted run, watching when the output file is open (the writing window)
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        window: list[float] = []
        while proc.poll() is None:
            if _writes_into(proc.pid, out_dir):
                window.append(time.time() - t0)
            time.sleep(0.01)
        full = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError("the uninterrupted quantize failed")
        complete = out.read_bytes()
        w0, w1 = (min(window), max(window)) if window else (0.0, full)
        results = {"full_run_s": round(full, 2), "writing_window_s": [round(w0, 2), round(w1, 2)], "kills": [],
                   "killed_while_writing": 0, "partial_outputs": 0, "litter": 0, "completed_before_kill": 0}
        for i in range(moments):
            out.write_bytes(previous)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i % 2 == 0:  # a random moment of the whole run
                moment = rng.uniform(0.0, full)
                time.sleep(moment)
            else:  # half the kills inside the writing window: wait for the output to be open
                t_start = time.time()
                while proc.poll() is None and not _writes_into(proc.pid, out_dir):
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.5) * (w1 - w0))
                moment = time.time() - t_start
            writing = _writes_into(proc.pid, out_dir)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            results["killed_while_writing"] += writing
            names = sorted(p.name for p in out_dir.iterdir())
            content = out.read_bytes() if out.exists() else None
            state = "previous" if content == previous else "complete" if content == complete else "PARTIAL"
            if state == "complete":
                results["completed_before_kill"] += 1
            if state == "PARTIAL":
                results["partial_outputs"] += 1
            if names != ["m.q"]:
                results["litter"] += 1
            results["kills"].append({"at_s": round(moment, 2), "writing": writing, "output": state, "files": names})
            if log:
                log(f"kill {i + 1}/{moments} at {moment:.2f} s of {full:.2f} ({'writing' if writing else 'not writing'}):"
                    f" output {state}, files {names}")
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -------------------------------------------------------------------------------- CLI


def _parse_cases(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        kind, n = part.split("=")
        if kind not in KINDS:
            raise SystemExit(f"unknown kind {kind}; kinds: {', '.join(KINDS)}")
        out[kind] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(f"{k}={v}" for k, v in FULL_RUN.items()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=CHUNK)
    ap.add_argument("--report", type=Path, help="write the summary as JSON here")
    ap.add_argument("--sigkill", type=int, metavar="N", help="instead: kill quantize at N random moments")
    ap.add_argument("--replay", nargs=2, metavar=("KIND", "CASE"), help="run one case in-process, with its traceback")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "START", "COUNT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replay:
        replay(args.replay[0], int(args.replay[1]), args.seed)
        return 0
    if args.worker:
        kind, start, count, seed = args.worker
        worker(kind, int(start), int(count), int(seed))
        return 0
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.sigkill:
        result = sigkill_test(args.sigkill, args.seed, log)
    else:
        result = run(_parse_cases(args.cases), args.seed, args.chunk, log)
    text = json.dumps(result, indent=1, default=str)
    if args.report:
        args.report.write_text(text + "\n")
    print(text)
    bad = result.get("partial_outputs", 0) + result.get("litter", 0) + sum(
        len(k["bugs"]) + len(k["hangs"]) + len(k["crashes"]) for k in result.get("kinds", {}).values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
