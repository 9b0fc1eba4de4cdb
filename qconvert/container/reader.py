"""Reader of container v1 (any minor version).

The file is memory-mapped; opening it parses only the header, and a tensor's bytes are
touched only when that tensor is asked for. Every count and length is checked against the
limits in FORMAT.md and against the file size before anything is allocated.
"""

from __future__ import annotations

import json
import mmap
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import BlockType, by_id
from ..errors import QConvertError
from .format import (
    FIXED_HEADER,
    MAGIC,
    MAJOR,
    MAX_ALIGNMENT,
    MAX_DIMS,
    MAX_HEADER_LEN,
    MAX_KV,
    MAX_TENSORS,
    MIN_ALIGNMENT,
    T_BOOL,
    T_BYTES,
    T_FLOAT64,
    T_INT64,
    T_JSON,
    T_STRING,
    T_UINT64,
    VALUE_TYPE_NAMES,
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
        return int(np.prod(self.shape, dtype=np.int64))


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


def decode_value(vtype: int, raw: bytes, key: str, what: str) -> Any:
    try:
        if vtype == T_UINT64:
            return struct.unpack("<Q", raw)[0]
        if vtype == T_INT64:
            return struct.unpack("<q", raw)[0]
        if vtype == T_FLOAT64:
            return struct.unpack("<d", raw)[0]
        if vtype == T_BOOL:
            if raw not in (b"\x00", b"\x01"):
                raise ValueError
            return raw == b"\x01"
        if vtype == T_STRING:
            return raw.decode()
        if vtype == T_BYTES:
            return raw
        if vtype == T_JSON:
            return json.loads(raw.decode())
    except (struct.error, ValueError, UnicodeDecodeError):
        raise QConvertError(f"corrupt container {what}: metadata value of {key!r} is malformed") from None
    raise AssertionError(vtype)


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
        magic, major, minor, alignment, header_crc, n_kv, n_tensors, header_len, data_offset = FIXED_HEADER.unpack(
            self._buf[: FIXED_HEADER.size]
        )
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
        # Each KV entry takes at least 12 bytes and each tensor entry at least 37: bound the counts
        # by the header length before looping over them.
        if n_kv * 12 + n_tensors * 37 > header_len:
            raise QConvertError(f"corrupt container {what}: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {header_len} header bytes")
        header = self._buf[FIXED_HEADER.size : FIXED_HEADER.size + header_len]
        if zlib.crc32(header) != header_crc:
            raise QConvertError(f"corrupt container {what}: header checksum mismatch")
        self.data_offset = data_offset

        cur = _Cursor(self._buf, FIXED_HEADER.size, FIXED_HEADER.size + header_len, what)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, int] = {}
        for _ in range(n_kv):
            (klen,) = cur.unpack("H")
            key = cur.text(klen, "metadata key")
            vtype, vlen = cur.unpack("BQ")
            raw = bytes(cur.take(vlen))
            if vtype not in VALUE_TYPE_NAMES:
                continue  # a value type from a newer minor version: skipped
            value = decode_value(vtype, raw, key, what)
            if key in self.metadata:
                raise QConvertError(f"corrupt container {what}: metadata key {key!r} appears twice")
            self.metadata[key] = value
            self.metadata_types[key] = vtype

        self.tensors: dict[str, TensorInfo] = {}
        data_len = self.file_size - data_offset
        for _ in range(n_tensors):
            (nlen,) = cur.unpack("H")
            name = cur.text(nlen, "tensor name")
            (n_dims,) = cur.unpack("B")
            if not 1 <= n_dims <= MAX_DIMS:
                raise QConvertError(f"corrupt container {what}: tensor {name!r} has {n_dims} dimensions")
            shape = cur.unpack(f"{n_dims}Q")
            type_id, offset, nbytes, crc = cur.unpack("HQQI")
            (elen,) = cur.unpack("I")
            extra: dict[str, Any] = {}
            if elen:
                try:
                    extra = json.loads(cur.text(elen, "tensor parameters"))
                except json.JSONDecodeError:
                    raise QConvertError(f"corrupt container {what}: parameters of tensor {name!r} are not JSON") from None
            if name in self.tensors:
                raise QConvertError(f"corrupt container {what}: tensor {name!r} appears twice")
            if offset % alignment or offset + nbytes > data_len:
                raise QConvertError(
                    f"corrupt or truncated container {what}: tensor {name!r} lies outside the file"
                    f" (bytes {data_offset + offset}..{data_offset + offset + nbytes} of {self.file_size})"
                )
            self.tensors[name] = TensorInfo(name, tuple(int(d) for d in shape), type_id, offset, nbytes, crc, extra)
        self._check_layout(what)
        self._verified: set[str] = set()

    def _check_layout(self, what: str) -> None:
        end = 0
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset < end:
                raise QConvertError(f"corrupt container {what}: tensor {info.name!r} overlaps the previous tensor")
            end = info.offset + info.nbytes
            try:
                expected = info.block_type.nbytes(info.shape)
            except QConvertError:
                continue  # unknown block type or bad shape: reported when the tensor is read
            if expected != info.nbytes:
                raise QConvertError(
                    f"corrupt container {what}: tensor {info.name!r} has {info.nbytes} bytes, its shape and type need {expected}"
                )

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
        start = self.data_offset + info.offset
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=start)
        if verify and name not in self._verified:
            if zlib.crc32(data) != info.crc32:
                raise QConvertError(f"corrupt container {self.path}: checksum mismatch in tensor {name!r}")
            self._verified.add(name)
        row_len = info.shape[-1]
        return data.reshape(-1, block_type.row_bytes(row_len))

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
