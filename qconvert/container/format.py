"""Constants of container format v1 (FORMAT.md is the normative text; keep them in step)."""

from __future__ import annotations

import struct
import zlib

MAGIC = b"QCVT"
MAJOR = 1
MINOR = 1  # 1.1 added the preamble checksum (PREAMBLE_CRC_KEY)
DEFAULT_ALIGNMENT = 64

# Fixed header: magic, major, minor, alignment, header_crc32, n_kv, n_tensors, header_len, data_offset
FIXED_HEADER = struct.Struct("<4sHHIIQQQQ")
assert FIXED_HEADER.size == 48

# Format 1.1: CRC-32 of the fixed header without its header_crc32 field (bytes 0-11 and 16-47),
# the first metadata entry; the header checksum covers it, so together they cover all 48 bytes.
PREAMBLE_CRC_KEY = "qconvert.preamble_crc32"

# Bounds checked before anything is allocated (FORMAT.md "Limits").
MAX_KV = 65_536
MAX_TENSORS = 1_000_000
MAX_HEADER_LEN = 1 << 30
MAX_DIMS = 8
MIN_ALIGNMENT = 16
MAX_ALIGNMENT = 65_536
MIN_KV_ENTRY = 2 + 1 + 1 + 8  # key_len, a 1-byte key, value_type, value_len
MIN_TENSOR_ENTRY = 2 + 1 + 1 + 8 + 2 + 8 + 8 + 4 + 4  # a 1-byte name, one dim, no params
# Python objects the JSON metadata and params of one file may decode to (safejson.object_bytes)
MAX_JSON_MEMORY = 512 << 20

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


# The value type each key of FORMAT.md §8 must have ("object": JSON holding an object).
KEY_TYPES = {
    PREAMBLE_CRC_KEY: T_UINT64,
    "qconvert.version": T_STRING,
    "model.architecture": T_STRING,
    "model.config": "object",
    "recipe": "object",
    "source": "object",
    "tokenizer.json": T_STRING,
    "tokenizer.gguf": "object",
    "gguf.kv": "object",
    "hf": "object",
    "imatrix": "object",
    "onnx.graph": T_BYTES,
    "onnx.weights": "object",
    "onnx.activations": "object",
}

# Keys of a tensor's params (FORMAT.md §4) this version understands; a tensor whose params hold
# another key is refused when read (it may change what the bytes mean), never decoded wrongly.
PARAMS_KEYS = {
    "NF4_DQ": {"dq_offset", "dq_absmax2", "dq_block"},
    "W8A8": {"row_scales", "act_scale"},
}
PARAMS_ANY_TYPE = {"input_perm"}


def preamble_crc(fixed_header: bytes | memoryview) -> int:
    """CRC-32 of the 48-byte fixed header without its header_crc32 field (bytes 12-15)."""
    return zlib.crc32(fixed_header[16:48], zlib.crc32(fixed_header[0:12]))


def pad_to(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
