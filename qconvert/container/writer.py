"""Streaming, atomic writer of container v1.

The tensor table is known before any tensor is read (names, shapes and block types fix every
size), so the header is written first with zeroed checksums, the tensors are streamed one by
one, and the checksums are patched in at the end. Everything goes to a file that gets the
output's name only once complete (qconvert/atomicfile.py): an interrupted run, even a SIGKILL,
never leaves a partial output or a temporary file.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomicfile import AtomicFile
from ..blocks import by_name
from ..errors import QConvertError
from .format import (
    DEFAULT_ALIGNMENT,
    FIXED_HEADER,
    MAGIC,
    MAJOR,
    MAX_DIMS,
    MINOR,
    T_BOOL,
    T_BYTES,
    T_FLOAT64,
    T_INT64,
    T_JSON,
    T_STRING,
    T_UINT64,
    PREAMBLE_CRC_KEY,
    pad_to,
    preamble_crc,
)


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    type_name: str
    extra: dict[str, Any] = field(default_factory=dict)  # per-tensor parameters (JSON)
    # Params known only once the tensor is quantized (NF4_DQ): reserve this many bytes of
    # header for them (BlockType.params_max_len(shape)) and pass them to write(extra=...).
    extra_reserve: int = 0

    @property
    def nbytes(self) -> int:
        return by_name(self.type_name).nbytes(self.shape)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_value(value: Any) -> tuple[int, bytes]:
    """Python value -> (value type, bytes). bool before int: bool is an int in Python."""
    if isinstance(value, bool):
        return T_BOOL, bytes([int(value)])
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if value >= 2**63:
            return T_UINT64, struct.pack("<Q", value)
        return T_INT64, struct.pack("<q", value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError("metadata floats must be finite")
        return T_FLOAT64, struct.pack("<d", float(value))
    if isinstance(value, str):
        return T_STRING, value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return T_BYTES, bytes(value)
    if isinstance(value, (dict, list, tuple)) or value is None:
        return T_JSON, canonical_json(value)
    raise TypeError(f"cannot store metadata value of type {type(value).__name__}")


def _encode_kv(key: str, value: Any) -> bytes:
    kb = key.encode()
    if not 0 < len(kb) < 2**16:
        raise ValueError(f"metadata key length out of range: {key!r}")
    vtype, vb = encode_value(value)
    return struct.pack("<H", len(kb)) + kb + struct.pack("<BQ", vtype, len(vb)) + vb


class ContainerWriter:
    """Write a container: ``with ContainerWriter(path, metadata, specs) as w: w.write(name, raw)``.

    Tensors must be written in the order of ``specs``; ``raw`` is the uint8 encoding of the
    tensor in its block type (exactly ``spec.nbytes`` bytes).
    """

    def __init__(
        self,
        path: str | Path,
        metadata: dict[str, Any],
        specs: list[TensorSpec],
        alignment: int = DEFAULT_ALIGNMENT,
    ) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self.specs = specs
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")

        if any(d < 0 for s in specs for d in s.shape):
            raise ValueError("tensor dimensions are non-negative")
        # the fixed header's checksum comes first (FORMAT.md §2); its value is patched in by close()
        key = PREAMBLE_CRC_KEY.encode()
        preamble = struct.pack("<H", len(key)) + key + struct.pack("<BQQ", T_UINT64, 8, 0)
        self._preamble_pos = len(preamble) - 8
        metadata = {k: v for k, v in metadata.items() if k != PREAMBLE_CRC_KEY}
        self._kv = preamble + b"".join(_encode_kv(k, metadata[k]) for k in metadata)
        self._extras = [dict(s.extra) for s in specs]
        offset = 0
        self._offsets: list[int] = []
        for spec in specs:
            if not 1 <= len(spec.shape) <= MAX_DIMS:
                raise ValueError(f"{spec.name}: tensors have 1..{MAX_DIMS} dimensions")
            self._offsets.append(offset)
            offset += pad_to(by_name(spec.type_name).nbytes(spec.shape), alignment)

        self._header, self._crc_positions = self._build_header(self._extras)
        self._n_kv = len(metadata) + 1
        reserved = len(self._header) + sum(
            max(0, s.extra_reserve - len(canonical_json(e) if e else b"")) for s, e in zip(specs, self._extras)
        )
        # header bytes beyond the final header_len stay zero (FORMAT.md §2: data_offset >= 48 + header_len)
        self._data_offset = pad_to(FIXED_HEADER.size + reserved, alignment)
        self._next = 0
        self._crcs: list[int] = []

        self._out = AtomicFile(self.path)  # no name until complete: a kill leaves nothing behind
        self._file = self._out.file
        try:
            self._file.write(self._fixed_header(0))
            self._file.write(self._header)
            self._file.write(b"\0" * (self._data_offset - FIXED_HEADER.size - len(self._header)))
        except BaseException:
            self.abort()
            raise

    def _build_header(self, extras: list[dict]) -> tuple[bytearray, list[int]]:
        """The metadata + tensor table with zeroed checksums, and each crc32 field's offset."""
        table = bytearray()
        positions = []
        for spec, extra, offset in zip(self.specs, extras, self._offsets):
            block_type = by_name(spec.type_name)
            name_b = spec.name.encode()
            extra_b = canonical_json(extra) if extra else b""
            table += struct.pack("<H", len(name_b)) + name_b
            table += struct.pack("<B", len(spec.shape)) + struct.pack(f"<{len(spec.shape)}Q", *spec.shape)
            table += struct.pack("<HQQ", block_type.id, offset, block_type.nbytes(spec.shape))
            positions.append(len(self._kv) + len(table))
            table += struct.pack("<I", 0)
            table += struct.pack("<I", len(extra_b)) + extra_b
        return bytearray(self._kv + table), positions

    def _fixed_header(self, header_crc: int) -> bytes:
        return FIXED_HEADER.pack(
            MAGIC, MAJOR, MINOR, self.alignment, header_crc, self._n_kv, len(self.specs), len(self._header), self._data_offset
        )

    def write(self, name: str, raw: np.ndarray | bytes, extra: dict[str, Any] | None = None) -> None:
        """Append the next tensor's bytes; ``extra``: its params, when they were reserved
        (``TensorSpec.extra_reserve``) rather than given up front."""
        if self._next >= len(self.specs):
            raise ValueError("more tensors written than declared")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name}, got {name}")
        if extra:
            if len(canonical_json(extra)) > max(spec.extra_reserve, len(canonical_json(spec.extra) if spec.extra else b"")):
                raise QConvertError(f"tensor {name}: its params exceed the {spec.extra_reserve} bytes reserved for them")
            self._extras[self._next] = dict(extra)
        data = memoryview(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)) if not isinstance(raw, bytes) else memoryview(raw)
        if data.nbytes != spec.nbytes:
            raise QConvertError(f"tensor {name}: encoded to {data.nbytes} bytes, expected {spec.nbytes}")
        self._crcs.append(zlib.crc32(data))
        self._file.write(data)
        self._file.write(b"\0" * (pad_to(spec.nbytes, self.alignment) - spec.nbytes))
        self._next += 1

    def close(self) -> Path:
        """Patch the checksums, flush to disk and move the file into place."""
        if self._next != len(self.specs):
            raise ValueError(f"only {self._next} of {len(self.specs)} tensors were written")
        self._header, self._crc_positions = self._build_header(self._extras)
        for pos, crc in zip(self._crc_positions, self._crcs):
            struct.pack_into("<I", self._header, pos, crc)
        struct.pack_into("<Q", self._header, self._preamble_pos, preamble_crc(self._fixed_header(0)))
        self._file.seek(0)
        self._file.write(self._fixed_header(zlib.crc32(self._header)))
        self._file.write(self._header)
        self._file.write(b"\0" * (self._data_offset - FIXED_HEADER.size - len(self._header)))
        return self._out.commit()

    def abort(self) -> None:
        """Drop what was written; the output path is left as it was."""
        self._out.discard()

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
