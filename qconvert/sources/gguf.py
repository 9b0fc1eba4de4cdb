"""Read a llama.cpp GGUF file as a :class:`~qconvert.sources.base.Source`.

The parser is our own (the ``gguf`` package is only a test dependency). Layout, per
llama.cpp ``ggml/src/gguf.cpp``: magic ``GGUF``, u32 version, u64 tensor count, u64 KV count,
the KV pairs, the tensor infos, padding to ``general.alignment`` (default 32), then the data
section; tensor offsets are relative to its start. Every count and length read from the file is
checked against the bytes that remain before anything is allocated, so a corrupt or hostile file
gives a :class:`QConvertError`, never a crash or a huge allocation.

Tensors come out under Hugging Face ``LlamaForCausalLM`` names, with numpy-order shapes, and
q/k projection rows put back into HF's rotate-half order (llama.cpp stores them pair-interleaved,
see :func:`unpermute_rows`). The blocks themselves are never re-quantized: un-permuting moves
whole rows of bytes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import QConvertError
from .base import Source, SourceTensor

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSORS = 1_000_000
MAX_KVS = 1_000_000
MAX_ARRAY_DEPTH = 4
# Elements of all metadata arrays together: each becomes a Python object (up to ~40 bytes from
# 1 byte of file) and is copied into the container's JSON metadata. A 262k vocabulary with
# scores, token types and merges has about 1.1 million.
MAX_ARRAY_ELEMENTS = 4_000_000
HASH_CHUNK = 1 << 20

# gguf_type -> (struct format, numpy dtype); STRING=8 and ARRAY=9 are handled apart.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<u1"),  # bool, one byte
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL, _FLOAT32, _FLOAT64 = 8, 9, 7, 6, 12
_VALUE_TYPE_NAMES = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}

# ggml_type names, only to make "unsupported type" messages say what the type is.
_GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0",
}
_FLOAT_TYPES = ("F32", "F16", "BF16")

# llama.cpp precomputes these from the config; HF derives them (read into the config instead)
_DERIVED = ("rope_freqs.weight",)


# --------------------------------------------------------------------------------------------
# q/k row permutation


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order convert_hf_to_gguf gives q/k: ``gguf = hf[permute_rows(...)]``.

    Its ``permute`` is ``w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)``: within each
    head, rotate-half order (all first halves, then all second halves) becomes adjacent pairs.
    """
    half = _half_head(n_rows, n_head)
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rows`: ``hf = gguf[unpermute_rows(...)]``."""
    half = _half_head(n_rows, n_head)
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


def _half_head(n_rows: int, n_head: int) -> int:
    if n_head <= 0 or n_rows % (2 * n_head):
        raise QConvertError(
            f"cannot undo llama.cpp's q/k row order: {n_rows} rows do not split into {n_head} heads of even size"
        )
    return n_rows // n_head // 2


# --------------------------------------------------------------------------------------------
# byte-level reader


class _Reader:
    """Bounds-checked little-endian reads from a buffer; every failure is a QConvertError."""

    def __init__(self, buf: Any, file_name: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.file_name = file_name
        self.elements_left = MAX_ARRAY_ELEMENTS

    def spend(self, count: int, what: str) -> None:
        """Account for ``count`` array elements about to become Python objects."""
        if count > self.elements_left:
            raise QConvertError(
                f"GGUF file {self.file_name}: {what} would bring its metadata arrays to more than"
                f" {MAX_ARRAY_ELEMENTS:,} elements, more than qconvert accepts (a 262k-token vocabulary needs about 1.1 million)"
            )
        self.elements_left -= count

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise QConvertError(
                f"truncated GGUF file {self.file_name}: {what} at byte {self.pos} needs {n} bytes "
                f"but only {self.remaining} remain (the file is cut short or corrupt)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def i32(self, what: str) -> int:
        return self.scalar("<i", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise QConvertError(
                f"corrupt GGUF file {self.file_name}: {what} at byte {self.pos - n} is not valid UTF-8"
            ) from None

    def string_array(self, count: int, what: str) -> list[str]:
        """``count`` strings; the same checks as :meth:`string`, in one tight loop (vocabularies
        hold 10^5 of them)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out: list[str] = []
        try:
            for i in range(count):
                if pos + 8 > size:
                    break
                (n,) = unpack(buf, pos)
                if pos + 8 + n > size:
                    break
                out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise QConvertError(
                f"corrupt GGUF file {self.file_name}: {what}[{len(out)}] at byte {pos + 8} is not valid UTF-8"
            ) from None
        self.pos = pos
        if len(out) < count:
            self.string(f"{what}[{len(out)}]")  # raises the truncation error with its position
        return out

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        """One KV value as plain Python (JSON-serialisable: str, int, float, bool, lists)."""
        if value_type in _SCALARS:
            fmt, _ = _SCALARS[value_type]
            v = self.scalar(fmt, what)
            if value_type == _BOOL:
                return bool(v)
            if value_type in (_FLOAT32, _FLOAT64) and not np.isfinite(v):
                raise QConvertError(f"GGUF file {self.file_name}: {what} is {v}, which qconvert cannot store (JSON has no NaN or infinity)")
            if value_type == _FLOAT32:
                return _shortest_float32(v)
            return v
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise QConvertError(
                    f"corrupt GGUF file {self.file_name}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
                )
            elem_type = self.i32(f"element type of {what}")
            count = self.u64(f"length of {what}")
            if elem_type in _SCALARS:
                fmt, dtype = _SCALARS[elem_type]
                nbytes = count * struct.calcsize(fmt)
                self.need(nbytes, f"{count} elements of {what}")
                self.spend(count, f"{what} ({count:,} elements)")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += nbytes
                if elem_type == _BOOL:
                    return [bool(x) for x in arr]
                if elem_type in (_FLOAT32, _FLOAT64) and not np.isfinite(arr).all():
                    bad = int(np.flatnonzero(~np.isfinite(arr))[0])
                    raise QConvertError(
                        f"GGUF file {self.file_name}: {what}[{bad}] is {arr[bad]}, which qconvert cannot store"
                        " (JSON has no NaN or infinity)"
                    )
                return arr.tolist()
            if elem_type == _STRING:
                self.need(count * 8, f"{count} elements of {what}")  # each has an 8-byte length
                self.spend(count, f"{what} ({count:,} elements)")
                return self.string_array(count, what)
            if elem_type == _ARRAY:
                self.need(count * 12, f"{count} elements of {what}")  # each has a 12-byte header
                self.spend(count, f"{what} ({count:,} elements)")
                return [self.value(elem_type, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise QConvertError(
                f"corrupt GGUF file {self.file_name}: {what} has unknown array element type {elem_type}"
            )
        raise QConvertError(f"corrupt GGUF file {self.file_name}: {what} has unknown value type {value_type}")


def _shortest_float32(x: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-")) if np.isfinite(x) else x


# --------------------------------------------------------------------------------------------
# header, KVs, tensor infos


class _TensorInfo:
    __slots__ = ("name", "shape", "type_id", "offset")

    def __init__(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> None:
        self.name, self.shape, self.type_id, self.offset = name, shape, type_id, offset


def _parse(r: _Reader) -> tuple[int, dict[str, Any], list[_TensorInfo], int]:
    """-> (version, kv, tensor infos with numpy-order shapes, absolute start of the data section)."""
    r.need(4, "magic")
    magic = bytes(r.buf[0:4])
    if magic != GGUF_MAGIC:
        raise QConvertError(f"{r.file_name} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    r.pos = 4
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise QConvertError(f"{r.file_name} is a big-endian GGUF file; qconvert reads little-endian GGUF only")
        raise QConvertError(
            f"GGUF version {version} of {r.file_name} is not supported (qconvert reads versions 2 and 3)"
            + ("; re-convert it with a current llama.cpp" if version < 2 else "")
        )
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    # smallest tensor info: name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8;
    # smallest KV: key length 8 + type 4 + one byte
    for count, what, limit in ((n_tensors, "tensors", MAX_TENSORS), (n_kv, "metadata entries", MAX_KVS)):
        if count > limit:
            raise QConvertError(
                f"corrupt GGUF file {r.file_name}: it claims {count} {what}, more than qconvert accepts ({limit})"
            )
    if n_tensors * 32 + n_kv * 13 > r.remaining:
        raise QConvertError(
            f"truncated GGUF file {r.file_name}: it claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"which need more than the {r.remaining} bytes that remain (the file is cut short or corrupt)"
        )

    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        value_type = r.i32(f"value type of {key!r}")
        if key in kv:
            raise QConvertError(f"corrupt GGUF file {r.file_name}: metadata key {key!r} appears twice")
        kv[key] = r.value(value_type, f"value of {key!r}")

    infos: list[_TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}")
        if name in seen:
            raise QConvertError(f"corrupt GGUF file {r.file_name}: tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise QConvertError(
                f"corrupt GGUF file {r.file_name}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            )
        dims = [r.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        n_elements = 1
        for d in dims:
            n_elements *= d
        if min(dims) < 1 or n_elements >= 2**62:
            raise QConvertError(f"corrupt GGUF file {r.file_name}: tensor {name!r} has invalid dimensions {dims}")
        type_id = r.i32(f"type of tensor {name!r}")
        offset = r.u64(f"data offset of tensor {name!r}")
        infos.append(_TensorInfo(name, tuple(reversed(dims)), type_id, offset))

    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise QConvertError(
            f"corrupt GGUF file {r.file_name}: general.alignment is {alignment!r}, not a positive power of two"
        )
    data_start = -(-r.pos // alignment) * alignment
    if infos and data_start > r.size:
        raise QConvertError(
            f"truncated GGUF file {r.file_name}: the data section should start at byte {data_start} "
            f"but the file has only {r.size} bytes"
        )
    return version, kv, infos, data_start


# --------------------------------------------------------------------------------------------
# config: the family's GGUF key table (arch/), plus the tokenizer's special ids


def _config(arch, gguf_arch: str, kv: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    for key in ("embedding_length", "block_count", "attention.head_count"):
        if f"{gguf_arch}.{key}" not in kv:
            raise QConvertError(f"GGUF metadata lacks {gguf_arch}.{key!r}, which a {gguf_arch} model needs")
    config = arch.config_from_gguf(kv, shapes, gguf_arch)
    config.setdefault("torch_dtype", "float32")
    config["qconvert_rope_layout"] = "rotate_half"
    for key, hf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        if type(kv.get("tokenizer.ggml." + key)) is int:
            config[hf_key] = kv["tokenizer.ggml." + key]
    return config


# --------------------------------------------------------------------------------------------
# the source


def _shifted(load: Callable[[], np.ndarray], delta: float) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        values = load().view("<f4") + np.float32(delta)
        return values.astype("<f4").view(np.uint8)

    return read


def _sha256(buf: Any) -> str:
    h = hashlib.sha256()
    for start in range(0, len(buf), HASH_CHUNK):
        h.update(buf[start : start + HASH_CHUNK])
        if isinstance(buf, mmap.mmap):  # hashed pages need not stay resident (issue #15)
            _release(buf, start, min(HASH_CHUNK, len(buf) - start))
    return h.hexdigest()


def _block_type(info: _TensorInfo):
    from ..blocks import by_id

    try:
        block_type = by_id(info.type_id)
    except QConvertError:
        known = _GGML_TYPE_NAMES.get(info.type_id)
        raise QConvertError(
            f"GGUF tensor {info.name!r} has block type id {info.type_id}"
            + (f" ({known})" if known else "")
            + ", which qconvert cannot read"
        ) from None
    try:
        nbytes = block_type.nbytes(info.shape)
    except QConvertError as e:
        raise QConvertError(f"GGUF tensor {info.name!r} of shape {list(info.shape)}: {e}") from None
    return block_type, nbytes


def _check_no_overlap(ranges: list[tuple[int, int, str]], file_name: str) -> None:
    """Two tensors sharing bytes (aliased data) make a file whose meaning depends on the reader."""
    prev_end, prev_name = 0, ""
    for start, end, name in sorted(ranges):
        if start < prev_end:
            raise QConvertError(f"corrupt GGUF file {file_name}: tensors {prev_name!r} and {name!r} share bytes {start}..{min(end, prev_end)}")
        if end > prev_end:
            prev_end, prev_name = end, name


def open_gguf(path: str | Path) -> Source:
    """Open a GGUF file (llama architecture) lazily; call ``close()`` (or use ``with``) when done."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise QConvertError(f"truncated GGUF file {path.name}: the file is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise QConvertError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    try:
        return _open(mm, path, size)
    except BaseException:
        _close_quietly(mm)
        raise


def _release(mm: mmap.mmap, start: int, nbytes: int) -> None:
    """Drop the mapped pages of bytes start..start+nbytes from this process's memory (issue #15:
    conversion memory stays near the largest tensor, not the file's size). The mapping is
    read-only and shared, so a later read faults the bytes in again from the file."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or nbytes <= 0:
        return
    first = start - start % mmap.PAGESIZE
    try:
        mm.madvise(advice, first, start + nbytes - first)
    except (OSError, ValueError):  # advice only
        pass


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a numpy view of it is still alive; the mapping goes with that view
        pass


def _open(mm: mmap.mmap, path: Path, size: int) -> Source:
    r = _Reader(mm, path.name)
    version, kv, infos, data_start = _parse(r)

    gguf_arch = kv.get("general.architecture")
    if not isinstance(gguf_arch, str):
        raise QConvertError(f"GGUF file {path.name} has no general.architecture, so its model type is unknown")
    from ..arch import by_gguf

    arch = by_gguf(gguf_arch, kv)
    split_count = kv.get("split.count", 1)
    if isinstance(split_count, int) and split_count > 1:
        raise QConvertError(
            f"{path.name} is part of a {split_count}-file split GGUF; merge it first with llama-gguf-split --merge"
        )

    shapes = {info.name: info.shape for info in infos}
    if "token_embd.weight" not in shapes:
        raise QConvertError(f"GGUF file {path.name} has no token_embd.weight tensor")
    config = _config(arch, gguf_arch, kv, shapes)
    arch.parse_config(config)  # one clear error for absurd hyper-parameters
    n_layers = config["num_hidden_layers"]
    n_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)

    def raw_reader(start: int, nbytes: int, rows: np.ndarray | None, row_bytes: int) -> Callable[[], np.ndarray]:
        def load_raw() -> np.ndarray:
            if mm.closed:
                raise QConvertError(f"GGUF file {path.name} was closed before its tensors were read")
            data = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
            if rows is None:
                out = data.copy()
            else:
                out = data.reshape(-1, row_bytes)[rows].reshape(-1)
            del data
            _release(mm, start, nbytes)  # the copy is ours: the mapped pages need not stay resident
            return out

        return load_raw

    tensors: list[SourceTensor] = []
    rope_freqs: list[float] | None = None
    ranges: list[tuple[int, int, str]] = []
    for info in infos:
        block_type, nbytes = _block_type(info)
        start = data_start + info.offset
        ranges.append((start, start + nbytes, info.name))
        if start >= size:
            raise QConvertError(
                f"corrupt GGUF file {path.name}: tensor {info.name!r} starts at byte {start} "
                f"(data offset {info.offset}), beyond the end of the file ({size} bytes)"
            )
        if start + nbytes > size:
            raise QConvertError(
                f"truncated GGUF file {path.name}: tensor {info.name!r} needs bytes {start} to {start + nbytes}, "
                f"beyond the end of the file ({size} bytes)"
            )
        if info.name in _DERIVED:
            if info.name == "rope_freqs.weight" and block_type.name == "F32":
                rope_freqs = np.frombuffer(mm, dtype="<f4", count=nbytes // 4, offset=start).tolist()
            continue
        hf_names = arch.hf_names(info.name, n_experts)
        if hf_names is None:
            raise QConvertError(
                f"GGUF tensor {info.name!r} has no Hugging Face {arch.name} equivalent; qconvert cannot convert this model yet"
            )
        layer = arch.layer_of(hf_names[0])
        if layer is not None and layer >= n_layers:
            raise QConvertError(f"GGUF tensor {info.name!r} belongs to layer {layer}, but the model has {n_layers} layers")
        if len(hf_names) > 1:  # llama.cpp's merged expert tensor: (n_experts, rows, cols) -> one per expert
            if len(info.shape) != 3 or info.shape[0] != len(hf_names):
                raise QConvertError(f"GGUF tensor {info.name!r} of shape {list(info.shape)} does not hold {len(hf_names)} experts")
            per = nbytes // len(hf_names)
            for e, hf_name in enumerate(hf_names):
                tensors.append(SourceTensor(hf_name, info.shape[1:], block_type.name,
                                            raw_reader(start + e * per, per, None, 0)))
            continue
        hf_name = hf_names[0]

        rows = None
        row_bytes = 0
        role = arch.role(hf_name)
        if arch.gguf_permute_qk and role in ("attn_q", "attn_k", "attn_q_bias", "attn_k_bias"):
            n_head = config["num_attention_heads" if role.startswith("attn_q") else "num_key_value_heads"]
            if len(info.shape) == 2:
                row_bytes = block_type.row_bytes(info.shape[1])
            elif len(info.shape) == 1 and block_type.block_size == 1:
                row_bytes = block_type.type_size  # a bias: each element is a "row"
            else:
                raise QConvertError(
                    f"GGUF tensor {info.name!r} of shape {list(info.shape)} and type {block_type.name} cannot be un-permuted"
                )
            try:
                rows = unpermute_rows(info.shape[0], n_head)
            except QConvertError as e:
                raise QConvertError(f"GGUF tensor {info.name!r}: {e}") from None
        load = raw_reader(start, nbytes, rows, row_bytes)
        offset = arch.gguf_value_offset.get(role)
        if offset:  # e.g. llama.cpp stores Gemma's norm weights as 1 + w
            if block_type.name != "F32":
                raise QConvertError(f"GGUF tensor {info.name!r} should be F32, is {block_type.name}")
            load = _shifted(load, -offset)
        tensors.append(SourceTensor(hf_name, info.shape, block_type.name, load))

    _check_no_overlap(ranges, path.name)
    if rope_freqs is not None:
        # llama.cpp stores Llama-3.1-style frequency scaling only as this tensor; the runtime
        # divides RoPE's frequencies by it (arch/llama.py).
        config["qconvert_rope_freq_factors"] = rope_freqs
        arch.parse_config(config)

    source_types: dict[str, int] = {}
    for t in tensors:
        source_types[t.dtype] = source_types.get(t.dtype, 0) + 1
    tokenizer = {k: v for k, v in kv.items() if k.startswith("tokenizer.") and k != "tokenizer.huggingface.json"}
    tokenizer_json = kv.get("tokenizer.huggingface.json")
    general = {k[len("general.") :]: v for k, v in kv.items() if k.startswith("general.")}
    other = {k: v for k, v in kv.items() if not k.startswith(("general.", "tokenizer."))}

    provenance: dict[str, Any] = {
        "kind": "gguf",
        "id": path.name,
        "revision": None,
        "files": [{"name": path.name, "bytes": size, "sha256": _sha256(mm)}],
        "quantized": any(len(t.shape) == 2 and t.dtype not in _FLOAT_TYPES for t in tensors),
        "source_types": source_types,
        "gguf_version": version,
        "file_type": general.get("file_type"),
        "general": general,
    }
    return Source(
        kind="gguf",
        architecture=arch.name,
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer_json if isinstance(tokenizer_json, str) else None,
        provenance=provenance,
        extra_metadata={"tokenizer.gguf": tokenizer, "gguf.kv": other},
        _close=lambda: _close_quietly(mm),
    )
