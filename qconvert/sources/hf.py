"""Hugging Face checkpoints: a local folder or a hub id, single or sharded safetensors.

safetensors headers are parsed here (8-byte length + JSON) so that every malformed or
truncated file gets one clear sentence; tensor bytes are read one tensor at a time
(os.pread, never left mapped). Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .. import safejson
from ..errors import QConvertError
from .base import Source, SourceTensor

_FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element
# every safetensors dtype (safetensors' Dtype): bytes per element, to check each entry's length
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit; safejson bounds the memory it takes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_checkpoint(spec: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local folder, or a hub id fetched through the normal Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, {"id": path.resolve().name, "revision": revision}
    if path.exists():
        raise QConvertError(f"{spec} is a file of a kind qconvert does not read (expected a folder, .gguf or .onnx)")
    if not _HUB_ID.match(spec):
        raise QConvertError(f"{spec} is neither an existing folder nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:  # pragma: no cover - it is a dependency
        raise QConvertError("huggingface-hub is not installed") from None
    try:
        local = snapshot_download(
            repo_id=spec,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
        )
    except HfHubHTTPError as e:
        raise QConvertError(f"could not download {spec} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    except Exception as e:  # offline mode, no network, missing revision ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QConvertError(
            f"could not get {spec} from the Hugging Face hub or its local cache ({first});"
            " pass a local folder, or set HF_HUB_OFFLINE=0 with network access"
        ) from None
    local_path = Path(local)
    # The snapshot folder name is the commit hash the revision resolved to.
    return local_path, {"id": spec, "revision": revision or "main", "commit": local_path.name}


class _SafetensorsFile:
    """One .safetensors file: parsed header; tensor bytes read on demand.

    Every entry is checked before any tensor is read: dtype a string, shape non-negative
    integers, byte length = elements × element size (Python ints: no overflow), inside the
    data, and no two tensors sharing bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        if self.size < 8:
            raise QConvertError(f"truncated safetensors file {path.name}: {self.size} bytes")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_SAFETENSORS_HEADER or 8 + n > self.size:
                raise QConvertError(
                    f"corrupt or truncated safetensors file {path.name}: header of {n} bytes does not fit in {self.size} bytes"
                    + (f" (qconvert reads headers of at most {MAX_SAFETENSORS_HEADER >> 20} MiB)" if 8 + n <= self.size else "")
                )
            raw = f.read(n)
        try:
            header = safejson.load_object(raw, "header")
        except safejson.JSONRefused as e:
            raise QConvertError(f"corrupt safetensors file {path.name}: header is not a JSON object ({e.reason})") from None
        self.data_start = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise QConvertError(f"corrupt safetensors file {path.name}: __metadata__ is not a JSON object")
        self.metadata = metadata
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        data_len = self.size - self.data_start
        for name, e in header.items():
            dtype, shape, begin, end = _entry(e)
            if dtype is None:
                raise QConvertError(f"corrupt safetensors file {path.name}: bad header entry for {name!r}")
            if end > data_len or begin > end:
                raise QConvertError(
                    f"truncated or corrupt safetensors file {path.name}: tensor {name!r} needs bytes"
                    f" {begin}..{end} of the data but the file holds {data_len}"
                )
            itemsize = _DTYPE_SIZES.get(dtype)
            if itemsize is not None and end - begin != math.prod(shape) * itemsize:
                raise QConvertError(
                    f"corrupt safetensors file {path.name}: tensor {name!r} ({dtype} {list(shape)}) needs"
                    f" {math.prod(shape) * itemsize} bytes, its offsets give {end - begin}"
                )
            self.entries[name] = (dtype, shape, begin, end)
        previous, prev_end = None, 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin < prev_end and end > begin:
                raise QConvertError(
                    f"corrupt safetensors file {path.name}: tensors {previous!r} and {name!r} share bytes"
                    f" ({begin}..{prev_end} of the data)"
                )
            if end > prev_end:
                previous, prev_end = name, end
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self, name: str) -> np.ndarray:
        """The tensor's bytes, read (os.pread: thread-safe) into a buffer of its own; nothing of the
        file stays mapped or resident in this process (issue #15: bounded conversion memory)."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fd = self._fd
        _, _, begin, end = self.entries[name]
        out = np.empty(end - begin, dtype=np.uint8)
        view, pos, done = memoryview(out), self.data_start + begin, 0
        while done < out.size:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise QConvertError(f"safetensors file {self.path.name} was truncated while tensor {name!r} was read")
            done += n
        return out

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _entry(e: Any) -> tuple[Any, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of a header entry; dtype None when the entry is malformed."""
    if not isinstance(e, dict):
        return None, (), 0, 0
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
    if not isinstance(dtype, str) or not ints(shape) or not ints(offsets) or len(offsets) != 2:
        return None, (), 0, 0
    return dtype, tuple(shape), offsets[0], offsets[1]


def _json_file(path: Path, folder: Path) -> dict[str, Any]:
    return safejson.load_file(path, f"{path.name} in {folder}")


def open_hf(spec: str, revision: str | None = None, hash_files: bool = True) -> Source:
    folder, ident = resolve_checkpoint(spec, revision)
    config_path = folder / "config.json"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    st_files = [n for n in names if n.endswith(".safetensors")]
    if not st_files:
        pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        from .llama2c import describe

        llama2c = [f"{n} ({describe(folder / n)})" for n in pickles if n.endswith(".bin") and describe(folder / n)]
        if llama2c:
            raise QConvertError(
                f"{folder.name} holds llama2.c files, not a Hugging Face checkpoint: {'; '.join(llama2c)};"
                " llama.cpp's llama-convert-llama2c-to-ggml turns a llama2.c model into GGUF"
            )
        if pickles:
            raise QConvertError(
                f"{folder.name} has only pickle checkpoints ({', '.join(pickles)}); qconvert never unpickles"
                " (it can run arbitrary code): convert them to safetensors first"
            )
        raise QConvertError(f"no .safetensors weights in {folder}")
    if not config_path.is_file():
        raise QConvertError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
    config = _json_file(config_path, folder)

    # GPTQ / AWQ checkpoints are imported as they are (sources/prequantized.py, which refuses
    # every other quantized checkpoint with one sentence).
    from .prequantized import Collector, detect

    prequant = detect(folder, config)
    collector = Collector(prequant) if prequant is not None else None
    if prequant is not None:  # kept in the provenance; the container's weights are not in that format
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    from ..arch import by_model_type

    model_type = str(config.get("model_type", ""))
    arch = by_model_type(model_type)
    arch.parse_config(config)  # one clear error for absurd hyper-parameters, before any work
    if arch.hf_transposed is not None:
        config = {**config, "qconvert_conv1d_transposed": True}  # see arch.hf_transposed below
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _json_file(index_path, folder).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise QConvertError(f"{index_path.name} has no weight_map (an object of tensor name -> shard file)")
        shard_names = sorted(set(weight_map.values()))
        outside = [s for s in shard_names if Path(s).is_absolute() or len(Path(s).parts) != 1]
        if outside:
            raise QConvertError(f"shard {outside[0]!r} listed in {index_path.name} is not a file of {folder.name}")
        missing = [s for s in shard_names if not (folder / s).is_file()]
        if missing:
            raise QConvertError(f"shard {missing[0]} listed in {index_path.name} is missing")
    else:
        if len(st_files) > 1:
            raise QConvertError(f"{folder.name} has several .safetensors files but no model.safetensors.index.json")
        weight_map, shard_names = None, st_files

    files = {s: _SafetensorsFile(folder / s) for s in shard_names}
    tensors: list[SourceTensor] = []
    seen: set[str] = set()
    dtypes: dict[str, int] = {}
    for shard in shard_names:
        f = files[shard]
        for name in sorted(f.entries):
            if weight_map is not None and weight_map.get(name) != shard:
                continue
            dtype, shape, begin, end = f.entries[name]
            if collector is not None and collector.claims(name):  # qweight / qzeros / scales / g_idx
                collector.add(name, f, dtype, shape, end - begin)
                continue
            if dtype not in _FLOAT_DTYPES:
                if dtype.startswith(("I", "U", "BOOL")):
                    continue  # integer buffers such as BERT's position_ids are not weights
                raise QConvertError(f"tensor {name!r} has dtype {dtype}; qconvert reads F32, F16 and BF16 checkpoints")
            if name in seen:
                raise QConvertError(f"tensor {name!r} appears in more than one shard")
            seen.add(name)
            if arch.hf_skip is not None and arch.hf_skip.search(name):
                continue  # buffers such as old GPT-2 checkpoints' causal masks, not weights
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
            load = lambda f=f, name=name: f.read(name)  # noqa: E731
            if arch.hf_transposed is not None and arch.hf_transposed.search(name) and len(shape) == 2:
                # e.g. GPT-2's Conv1D stores (in, out); the container stores (out, in) like every Linear.
                load = _transposed(load, shape, _FLOAT_DTYPES[dtype])
                shape = (shape[1], shape[0])
            tensors.append(SourceTensor(name, shape if shape else (1,), dtype, load))
    if collector is not None:
        imported = collector.tensors()
        if not imported:  # only a stale quantize_config.json beside float weights
            prequant = None
        for t in imported:
            if t.name in seen:
                raise QConvertError(f"tensor {t.name!r} is both a float tensor and a quantized module in the checkpoint")
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
            tensors.append(t)
    tensors.sort(key=lambda t: _natural_key(t.name))

    tok_path = folder / "tokenizer.json"
    tokenizer_json = None
    if tok_path.is_file():  # its content is checked by runtime.tokenizer.check_source_tokenizer
        try:
            tokenizer_json = str(safejson.read_file(tok_path, f"tokenizer.json in {folder}"), "utf-8")
        except UnicodeDecodeError as e:
            raise QConvertError(f"tokenizer.json in {folder} is not UTF-8 text (bad byte at offset {e.start})") from None
    extra: dict[str, Any] = {}
    for aux in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        p = folder / aux
        if p.is_file():
            extra[aux] = _json_file(p, folder)

    hashed = [*shard_names, "config.json"] + (["tokenizer.json"] if tokenizer_json else [])
    provenance = {
        "kind": "hf",
        **ident,
        "files": [
            {
                "name": n,
                "bytes": (folder / n).stat().st_size,
                **({"sha256": sha256_file(folder / n)} if hash_files else {}),
            }
            for n in sorted(hashed)
        ],
        "quantized": prequant is not None,
        "source_types": dtypes,
    }
    if prequant is not None:
        provenance["quantization"] = prequant.summary()
        provenance["quantization_config"] = prequant.config
    return Source(
        kind="hf",
        architecture=arch.name,
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        provenance=provenance,
        extra_metadata={"hf": extra} if extra else {},
        _close=lambda: [f.close() for f in files.values()] and None,
    )


def _transposed(load, shape: tuple[int, int], itemsize: int):
    def read() -> np.ndarray:
        values = load().view(f"<u{itemsize}").reshape(shape)
        return np.ascontiguousarray(values.T).view(np.uint8).reshape(-1)

    return read


def _natural_key(name: str) -> list:
    """model.layers.10 after model.layers.9: deterministic, human order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
