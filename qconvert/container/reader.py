"""Reader of container v1 (any minor version).

The file is memory-mapped; opening it parses only the header, and a tensor's bytes are
touched only when that tensor is asked for. Every count and length is checked against the
limits in FORMAT.md and against the file size before anything is allocated.
"""

from __future__ import annotations

import math
import mmap
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import BlockType, by_id
from .. import safejson
from ..errors import QConvertError
from .format import (
    FIXED_HEADER,
    MAGIC,
    MAJOR,
    MAX_ALIGNMENT,
    MAX_DIMS,
    KEY_TYPES,
    MAX_HEADER_LEN,
    MAX_JSON_MEMORY,
    MAX_KV,
    MAX_TENSORS,
    MIN_ALIGNMENT,
    MIN_KV_ENTRY,
    MIN_TENSOR_ENTRY,
    PARAMS_ANY_TYPE,
    PARAMS_KEYS,
    PREAMBLE_CRC_KEY,
    T_BOOL,
    T_BYTES,
    T_FLOAT64,
    T_INT64,
    T_JSON,
    T_STRING,
    T_UINT64,
    VALUE_TYPE_NAMES,
    preamble_crc,
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # relative to the data section
    nbytes: int
    crc32: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def block_type(self) -> BlockType:
        return by_id(self.type_id)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)  # Python ints: no wrap-around


class _Cursor:
    """Bounded little-endian reads over the header region; every overrun is a clear error."""

    def __init__(self, buf: memoryview, start: int, end: int, what: str) -> None:
        self.buf, self.pos, self.end, self.what = buf, start, end, what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise QConvertError(f"corrupt container {self.what}: header entry runs past the end of the header")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def text(self, n: int, kind: str) -> str:
        try:
            return bytes(self.take(n)).decode()
        except UnicodeDecodeError:
            raise QConvertError(f"corrupt container {self.what}: {kind} is not valid UTF-8") from None


def decode_value(vtype: int, raw: memoryview | bytes, key: str, what: str,
                 json_budget: safejson.Budget | None = None) -> Any:
    """One metadata value (FORMAT.md §3); ``json_budget``: what the file's JSON values may
    still take in memory (each value spends some)."""
    try:
        if vtype == T_UINT64:
            return struct.unpack("<Q", raw)[0]
        if vtype == T_INT64:
            return struct.unpack("<q", raw)[0]
        if vtype == T_FLOAT64:
            (value,) = struct.unpack("<d", raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if vtype == T_BOOL:
            if bytes(raw) not in (b"\x00", b"\x01"):
                raise ValueError
            return bytes(raw) == b"\x01"
        if vtype == T_STRING:
            return str(raw, "utf-8")
        if vtype == T_BYTES:
            return bytes(raw)
    except (struct.error, ValueError, UnicodeDecodeError):
        raise QConvertError(f"corrupt container {what}: metadata value of {key!r} is malformed") from None
    if vtype == T_JSON:
        budget = json_budget if json_budget is not None else safejson.Budget(MAX_JSON_MEMORY)
        return safejson.loads(raw, f"corrupt container {what}: metadata {key!r}", budget)
    raise AssertionError(vtype)


def _check_params(info: "TensorInfo", what: str) -> None:
    """Malformed values of the params keys this version knows (an act-order permutation that
    is not one) make the file corrupt; unknown keys are refused when the tensor is read."""
    perm = info.extra.get("input_perm")
    if perm is not None:
        n = info.shape[-1]
        ok = isinstance(perm, list) and len(perm) == n and all(type(i) is int for i in perm)
        if not ok or sorted(perm) != list(range(n)):
            raise QConvertError(
                f"corrupt container {what}: tensor {info.name!r} has an input_perm that is not a permutation of its {n} columns"
            )


class Container:
    """An open container file. Use :func:`qconvert.load` or ``open_container``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        what = str(self.path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise QConvertError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise QConvertError(f"{path} is a directory, not a qconvert container") from None
        try:
            self.file_size = self.path.stat().st_size
            if self.file_size < FIXED_HEADER.size:
                raise QConvertError(f"{what} is not a qconvert container (file too short: {self.file_size} bytes)")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._mmap)
            self._parse(what)
        except BaseException:
            self.close()
            raise

    def _parse(self, what: str) -> None:
        fixed = self._buf[: FIXED_HEADER.size]
        magic, major, minor, alignment, header_crc, n_kv, n_tensors, header_len, data_offset = FIXED_HEADER.unpack(fixed)
        if magic != MAGIC:
            raise QConvertError(f"{what} is not a qconvert container (bad magic {bytes(magic)!r})")
        if major != MAJOR:
            raise QConvertError(
                f"{what} is container format {major}.{minor}; this qconvert reads format {MAJOR}.x only"
                + (" - upgrade qconvert" if major > MAJOR else "")
            )
        self.major, self.minor, self.alignment = major, minor, alignment
        if not (MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT and alignment & (alignment - 1) == 0):
            raise QConvertError(f"corrupt container {what}: alignment {alignment} is not a power of two in range")
        if n_kv > MAX_KV:
            raise QConvertError(f"corrupt container {what}: header claims {n_kv} metadata entries (limit {MAX_KV})")
        if n_tensors > MAX_TENSORS:
            raise QConvertError(f"corrupt container {what}: header claims {n_tensors} tensors (limit {MAX_TENSORS})")
        if header_len > MAX_HEADER_LEN or FIXED_HEADER.size + header_len > self.file_size:
            raise QConvertError(f"corrupt or truncated container {what}: header length {header_len} exceeds the file")
        if data_offset % alignment or data_offset < FIXED_HEADER.size + header_len or data_offset > self.file_size:
            raise QConvertError(f"corrupt or truncated container {what}: data offset {data_offset} is invalid")
        # bound the counts by the header length (the smallest possible entries) before looping
        if n_kv * MIN_KV_ENTRY + n_tensors * MIN_TENSOR_ENTRY > header_len:
            raise QConvertError(f"corrupt container {what}: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {header_len} header bytes")
        end = FIXED_HEADER.size + header_len
        if zlib.crc32(self._buf[FIXED_HEADER.size : end]) != header_crc:
            raise QConvertError(f"corrupt container {what}: header checksum mismatch")
        if any(self._buf[end:data_offset]):
            raise QConvertError(f"corrupt container {what}: the bytes between the header and the data section are not zero")
        self.data_offset = data_offset

        cur = _Cursor(self._buf, FIXED_HEADER.size, end, what)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, int] = {}
        json_budget = safejson.Budget(MAX_JSON_MEMORY)  # shared by every JSON value and params of the file
        for _ in range(n_kv):
            (klen,) = cur.unpack("H")
            if klen == 0:
                raise QConvertError(f"corrupt container {what}: a metadata key is empty")
            key = cur.text(klen, "metadata key")
            vtype, vlen = cur.unpack("BQ")
            raw = cur.take(vlen)
            if key in self.metadata:
                raise QConvertError(f"corrupt container {what}: metadata key {key!r} appears twice")
            if vtype not in VALUE_TYPE_NAMES:
                continue  # a value type from a newer minor version: skipped
            self.metadata[key] = decode_value(vtype, raw, key, what, json_budget)
            self.metadata_types[key] = vtype
        self._check_metadata(what, bytes(fixed))

        self.tensors: dict[str, TensorInfo] = {}
        data_len = self.file_size - data_offset
        for _ in range(n_tensors):
            (nlen,) = cur.unpack("H")
            if nlen == 0:
                raise QConvertError(f"corrupt container {what}: a tensor name is empty")
            name = cur.text(nlen, "tensor name")
            (n_dims,) = cur.unpack("B")
            if not 1 <= n_dims <= MAX_DIMS:
                raise QConvertError(f"corrupt container {what}: tensor {name!r} has {n_dims} dimensions")
            shape = cur.unpack(f"{n_dims}Q")
            type_id, offset, nbytes, crc = cur.unpack("HQQI")
            (elen,) = cur.unpack("I")
            extra: dict[str, Any] = {}
            if elen:
                extra = safejson.loads(cur.take(elen), f"corrupt container {what}: the params of tensor {name!r}", json_budget)
                if not isinstance(extra, dict):
                    raise QConvertError(f"corrupt container {what}: the params of tensor {name!r} are not a JSON object")
            if name in self.tensors:
                raise QConvertError(f"corrupt container {what}: tensor {name!r} appears twice")
            if offset % alignment or offset + nbytes > data_len:
                raise QConvertError(
                    f"corrupt or truncated container {what}: tensor {name!r} lies outside the file"
                    f" (bytes {data_offset + offset}..{data_offset + offset + nbytes} of {self.file_size})"
                )
            info = TensorInfo(name, tuple(shape), type_id, offset, nbytes, crc, extra)
            _check_params(info, what)
            self.tensors[name] = info
        if cur.pos != end:
            raise QConvertError(
                f"corrupt container {what}: its {n_kv} metadata entries and {n_tensors} tensor entries end at byte"
                f" {cur.pos}, but the header says they end at byte {end}"
            )
        self._check_layout(what)
        self._verified: set[str] = set()

    def _check_metadata(self, what: str, fixed: bytes) -> None:
        """Known keys have the value type FORMAT.md §8 gives them; 1.1 files carry the
        checksum of their fixed header."""
        for key, want in KEY_TYPES.items():
            if key not in self.metadata:
                continue
            have = self.metadata_types[key]
            if want == "object":
                if have != T_JSON or not isinstance(self.metadata[key], dict):
                    kind = "JSON " + type(self.metadata[key]).__name__ if have == T_JSON else VALUE_TYPE_NAMES[have]
                    raise QConvertError(
                        f"corrupt container {what}: metadata {key!r} is {kind}; FORMAT.md §8 makes it a JSON object"
                    )
            elif have != want:
                raise QConvertError(
                    f"corrupt container {what}: metadata {key!r} is {VALUE_TYPE_NAMES[have]};"
                    f" FORMAT.md §8 makes it {VALUE_TYPE_NAMES[want]}"
                )
        stored = self.metadata.pop(PREAMBLE_CRC_KEY, None)  # structure, not content: not shown
        self.metadata_types.pop(PREAMBLE_CRC_KEY, None)
        if stored is None and self.minor >= 1:
            raise QConvertError(f"corrupt container {what}: format {self.major}.{self.minor} needs metadata {PREAMBLE_CRC_KEY!r}")
        if stored is not None and stored != preamble_crc(fixed):
            raise QConvertError(f"corrupt container {what}: the fixed header (bytes 0-47) fails its checksum")

    def _check_layout(self, what: str) -> None:
        end = 0
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.nbytes == 0:
                continue  # an empty tensor takes no bytes, wherever its offset points
            if info.offset < end:
                raise QConvertError(f"corrupt container {what}: tensor {info.name!r} overlaps the previous tensor")
            end = info.offset + info.nbytes
        for info in self.tensors.values():
            try:
                expected = info.block_type.nbytes(info.shape)
            except QConvertError:
                expected = None  # unknown block type or bad shape: reported when the tensor is read
            if expected is not None and expected != info.nbytes:
                raise QConvertError(
                    f"corrupt container {what}: tensor {info.name!r} has {info.nbytes} bytes, its shape and type need {expected}"
                )
            # an empty tensor (nbytes 0) is not bounded by its bytes; its other dims must still make an array
            if math.prod(d for d in info.shape if d) >= 2**60:
                raise QConvertError(f"corrupt container {what}: tensor {info.name!r} has dimensions {list(info.shape)} no array can have")

    # -- tensors --------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise QConvertError(f"{self.path} has no tensor named {name!r}") from None

    def raw(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array (rows, row_bytes), backed by the mmap."""
        info = self.info(name)
        block_type = info.block_type  # raises for a block type this version does not know
        unknown = set(info.extra) - PARAMS_KEYS.get(block_type.name, set()) - PARAMS_ANY_TYPE
        if unknown:  # FORMAT.md §4: params keys are must-understand
            raise QConvertError(
                f"tensor {name!r} of {self.path} has params this qconvert does not understand"
                f" ({', '.join(sorted(unknown))}); it may need a newer qconvert"
            )
        start = self.data_offset + info.offset
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=start)
        if verify and name not in self._verified:
            if zlib.crc32(data) != info.crc32:
                raise QConvertError(f"corrupt container {self.path}: checksum mismatch in tensor {name!r}")
            self._verified.add(name)
        row_bytes = block_type.row_bytes(info.shape[-1])
        if row_bytes == 0:  # an empty tensor (a zero dimension)
            return data.reshape(math.prod(info.shape[:-1]), 0)
        return data.reshape(-1, row_bytes)

    def tensor(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor dequantized to float32, in its shape."""
        info = self.info(name)
        return info.block_type.dequantize(self.raw(name, verify), info.shape, info.extra)

    def verify(self) -> list[str]:
        """Check every tensor's checksum; returns the names that fail."""
        bad = []
        for name, info in self.tensors.items():
            data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=self.data_offset + info.offset)
            if zlib.crc32(data) != info.crc32:
                bad.append(name)
        return bad

    # -- convenience ------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("model.architecture")

    @property
    def config(self) -> dict[str, Any]:
        return self.metadata.get("model.config") or {}

    @property
    def recipe(self) -> dict[str, Any]:
        return self.metadata.get("recipe") or {}

    @property
    def source(self) -> dict[str, Any]:
        return self.metadata.get("source") or {}

    def close(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            buf.release()
            self._buf = None
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still alive; the mapping closes when they go
            self._mmap = None
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
            self._file = None

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Container {self.path} v{self.major}.{self.minor} {len(self.tensors)} tensors>"


def open_container(path: str | Path) -> Container:
    return Container(path)
