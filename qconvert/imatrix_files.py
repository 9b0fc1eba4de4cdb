"""llama.cpp's importance-matrix files, read and written: bring an imatrix made by
llama-imatrix (``--imatrix imatrix.dat`` / ``imatrix.gguf``), or give ours to llama-quantize.

Both formats are llama.cpp's (tools/imatrix/imatrix.cpp writes them, tools/quantize/quantize.cpp
reads them); all numbers little-endian.

Legacy ``.dat``::

    int32 n_entries
    n_entries x { int32 name_len, name, int32 ncall, int32 nval, float32 values[nval] }
    int32 chunk_count, int32 dataset_len, dataset          (trailer; older files lack it)

  ``values`` = mean of x^2 per input column, times ``ncall`` (the windows seen, rounded up);
  llama-quantize divides by ``ncall``.

GGUF (``general.type = "imatrix"``), one pair of F32 tensors per weight matrix::

    <name>.in_sum2   [n_mat, n_cols]  sum of x^2 over the tokens seen
    <name>.counts    [n_mat, 1]       tokens seen
    <name>.in_sum    [n_mat, n_cols]  sum of x (newer files; not needed here)
    imatrix.datasets (string array), imatrix.chunk_count, imatrix.chunk_size (uint32)

  mean of x^2 = in_sum2 / counts; a matrix that saw no token counts as all ones, as in
  llama-quantize.
Entry names are llama.cpp's; qconvert's are Hugging Face names. The family tables in
``qconvert/arch/`` translate them (both directions). Importance is per input
column, so llama.cpp's q/k row permutation does not touch it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QConvertError

GGUF_MAGIC = b"GGUF"
DAT, GGUF = "llama.cpp imatrix.dat", "llama.cpp imatrix GGUF"
MAX_ENTRIES = 1 << 20


def llama_format_for(path: str | Path) -> str | None:
    """The llama.cpp format an output path asks for by its suffix (.dat or .gguf), else None."""
    suffix = Path(path).suffix.lower()
    return {".dat": DAT, ".gguf": GGUF}.get(suffix)


def is_llama_imatrix(path: str | Path) -> bool:
    """True for a file in one of llama.cpp's formats (anything but a qconvert container)."""
    from .container.format import MAGIC

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False  # the container reader reports the missing file
    return head != MAGIC and len(head) == 4


def _hf_names(llama_names: list[str], path: Path, arch=None) -> list[str]:
    """Hugging Face names of llama.cpp names: by the model's own family when known (Phi-3's
    ``ffn_up`` is its gate_up_proj, Llama's is up_proj), else by the first family that has them."""
    from .arch import hf_name_for_gguf

    out = []
    for name in llama_names:
        if arch is not None:
            names = arch.hf_names(name)
            hf = names[0] if names is not None and len(names) == 1 else None
        else:
            hf = hf_name_for_gguf(name)
        if hf is None:
            raise QConvertError(f"importance matrix {path.name}: entry {name!r} is not a"
                                f" {arch.name if arch is not None else 'llama'} weight matrix qconvert knows")
        out.append(hf)
    return out


def _checked(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all() or (values < 0).any():
        raise QConvertError(f"importance matrix {path.name}: entry {name!r} has negative or non-finite values")
    return values


def read_llama_imatrix(path: str | Path, arch=None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({Hugging Face tensor name: mean x^2 per input column}, info) from a llama.cpp file;
    ``arch`` (the model's family, when known) names the entries."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QConvertError(f"cannot read importance matrix {path}: {e.strerror or e}") from None
    names, values, info = _read_gguf(data, path) if data[:4] == GGUF_MAGIC else _read_dat(data, path)
    importance = {hf: _checked(path, n, v) for n, hf, v in zip(names, _hf_names(names, path, arch), values)}
    info.update(entries=len(importance), file=path.name, file_sha256=hashlib.sha256(data).hexdigest())
    return importance, info


def _read_dat(data: bytes, path: Path) -> tuple[list[str], list[np.ndarray], dict]:
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise QConvertError(
                f"importance matrix {path.name} is neither a qconvert container, a GGUF file nor a complete"
                f" llama.cpp imatrix.dat: it ends inside {what}"
            )
        pos += n
        return data[pos - n : pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if not 0 < n_entries <= MAX_ENTRIES:
        raise QConvertError(f"importance matrix {path.name} is not a llama.cpp imatrix.dat: it claims {n_entries} entries")
    names, values = [], []
    for i in range(n_entries):
        length = i32(f"the name length of entry {i}")
        if not 0 < length <= 4096:
            raise QConvertError(f"importance matrix {path.name}: entry {i} has a name of {length} bytes")
        try:
            name = take(length, f"the name of entry {i}").decode()
        except UnicodeDecodeError:
            raise QConvertError(f"importance matrix {path.name}: the name of entry {i} is not UTF-8") from None
        ncall, nval = i32(f"the ncall of {name}"), i32(f"the value count of {name}")
        if nval <= 0:
            raise QConvertError(f"importance matrix {path.name}: entry {name!r} has {nval} values")
        v = np.frombuffer(take(4 * nval, f"the values of {name}"), "<f4").astype(np.float32)
        names.append(name)
        values.append(v / ncall if ncall > 0 else v.copy())  # llama-quantize's reading
    info: dict[str, Any] = {"format": DAT}
    if len(data) - pos >= 8:  # trailer: chunk count, dataset name
        info["chunks"] = i32("the chunk count")
        length = i32("the dataset name length")
        if 0 < length <= len(data) - pos:
            info["datasets"] = [take(length, "the dataset name").decode(errors="replace")]
    return names, values, info


def _read_gguf(data: bytes, path: Path) -> tuple[list[str], list[np.ndarray], dict]:
    from .sources.gguf import _parse, _Reader

    _, kv, infos, data_start = _parse(_Reader(data, path.name))
    if kv.get("general.type") not in (None, "imatrix") or not any(t.name.endswith(".in_sum2") for t in infos):
        raise QConvertError(f"{path.name} is a GGUF file but not an importance matrix (no <name>.in_sum2 tensors)")
    tensors = {}
    for t in infos:
        if t.type_id != 0:
            raise QConvertError(f"importance matrix {path.name}: tensor {t.name!r} is not F32")
        n = math.prod(t.shape)
        start = data_start + t.offset
        if start + 4 * n > len(data):
            raise QConvertError(f"truncated importance matrix {path.name}: tensor {t.name!r} runs past the end")
        tensors[t.name] = np.frombuffer(data, "<f4", n, start).reshape(t.shape)
    names, values = [], []
    for key in sorted(tensors):
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        sums, counts = tensors[key], tensors.get(name + ".counts")
        if counts is None or counts.size != sums.shape[0]:
            raise QConvertError(f"importance matrix {path.name}: {name!r} has sums but no matching counts")
        if sums.shape[0] != 1:
            raise QConvertError(
                f"importance matrix {path.name}: {name!r} holds {sums.shape[0]} matrices (experts); qconvert reads 2-D weights only"
            )
        count = float(counts.reshape(-1)[0])
        names.append(name)
        values.append((sums[0] / count).astype(np.float32) if count > 0 else np.ones(sums.shape[1], np.float32))
    info: dict[str, Any] = {"format": GGUF}
    for key, field in (("imatrix.chunk_count", "chunks"), ("imatrix.chunk_size", "ctx"), ("imatrix.datasets", "datasets")):
        if key in kv:
            info[field] = kv[key]
    return names, values, info


def write_llama_imatrix(path: str | Path, importance: dict[str, np.ndarray], info: dict, fmt: str) -> Path:
    """Write ``importance`` (mean x^2 per column, Hugging Face names) in llama.cpp's ``fmt``
    (DAT or GGUF), atomically. ``info``: tokens, ctx and chunks of the collection."""
    from .arch import gguf_name_for_hf

    path = Path(path)
    entries = [(gguf_name_for_hf(n), np.asarray(v, np.float64).reshape(-1)) for n, v in importance.items()]
    if len({name for name, _ in entries}) != len(entries):  # MoE experts share llama.cpp's merged tensor
        raise QConvertError("a mixture-of-experts importance matrix cannot be written in llama.cpp's formats yet"
                            " (experts share one merged tensor there); write a qconvert container (.q) instead")
    entries.sort(key=lambda e: e[0])
    ctx, chunks = int(info["ctx"]), int(info["chunks"])
    tokens = int(info.get("tokens") or ctx * chunks)
    dataset = str(info.get("calibration_file") or "")
    blob = _dat_bytes(entries, ctx, chunks, tokens, dataset) if fmt == DAT else _gguf_bytes(entries, ctx, chunks, tokens, dataset)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _dat_bytes(entries, ctx: int, chunks: int, tokens: int, dataset: str) -> bytes:
    ncall = -(-tokens // ctx)  # llama-imatrix rounds the windows up "to avoid accidental zeros"
    out = [struct.pack("<i", len(entries))]
    for name, mean in entries:
        nb = name.encode()
        out += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", ncall, mean.size), (mean * ncall).astype("<f4").tobytes()]
    db = dataset.encode()
    out += [struct.pack("<ii", chunks, len(db)), db]
    return b"".join(out)


def _gguf_bytes(entries, ctx: int, chunks: int, tokens: int, dataset: str) -> bytes:
    from .export.gguf import ALIGNMENT, ARRAY, STRING, U32, _kv, _string

    kvs = [_kv("general.type", STRING, "imatrix"), _kv("imatrix.datasets", ARRAY, [dataset] if dataset else [], STRING),
           _kv("imatrix.chunk_count", U32, chunks), _kv("imatrix.chunk_size", U32, ctx)]
    tensors = []
    for name, mean in entries:
        tensors.append((name + ".counts", np.full((1, 1), tokens, np.float32)))
        tensors.append((name + ".in_sum2", (mean * tokens).astype(np.float32).reshape(1, -1)))
    tensors.sort(key=lambda t: t[0])
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs))
    body, offset = bytearray(), 0
    for name, array in tensors:
        header += _string(name) + struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}Q", *reversed(array.shape))
        header += struct.pack("<iQ", 0, offset)  # type 0: F32
        raw = array.astype("<f4").tobytes()
        body += raw + b"\0" * (-len(raw) % ALIGNMENT)
        offset += len(raw) + (-len(raw) % ALIGNMENT)
    header += b"\0" * (-len(header) % ALIGNMENT)
    return bytes(header + body)
