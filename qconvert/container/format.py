"""Constants of container format v1 (FORMAT.md is the normative text; keep them in step)."""

from __future__ import annotations

import struct

MAGIC = b"QCVT"
MAJOR = 1
MINOR = 0
DEFAULT_ALIGNMENT = 64

# Fixed header: magic, major, minor, alignment, header_crc32, n_kv, n_tensors, header_len, data_offset
FIXED_HEADER = struct.Struct("<4sHHIIQQQQ")
assert FIXED_HEADER.size == 48

# Bounds checked before anything is allocated (FORMAT.md "Limits").
MAX_KV = 65_536
MAX_TENSORS = 1_000_000
MAX_HEADER_LEN = 1 << 30
MAX_DIMS = 8
MIN_ALIGNMENT = 16
MAX_ALIGNMENT = 65_536

# Metadata value types.
T_UINT64 = 1
T_INT64 = 2
T_FLOAT64 = 3
T_BOOL = 4
T_STRING = 5
T_BYTES = 6
T_JSON = 7
VALUE_TYPE_NAMES = {
    T_UINT64: "UINT64",
    T_INT64: "INT64",
    T_FLOAT64: "FLOAT64",
    T_BOOL: "BOOL",
    T_STRING: "STRING",
    T_BYTES: "BYTES",
    T_JSON: "JSON",
}


def pad_to(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
