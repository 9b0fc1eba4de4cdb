"""Write spec/example.q, the smallest useful container, and print FORMAT.md §11's annotated dump.

    python spec/make_example.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert.blocks import by_name  # noqa: E402
from qconvert.container import ContainerWriter, TensorSpec  # noqa: E402

HERE = Path(__file__).resolve().parent
VALUES = (np.arange(32, dtype=np.float32) - 16) / 8  # -2.0, -1.875, ..., 1.875


def write(path: Path) -> bytes:
    with ContainerWriter(path, {"model.architecture": "llama"}, [TensorSpec("w", (1, 32), "Q8_0")]) as w:
        w.write("w", by_name("Q8_0").quantize(VALUES.reshape(1, 32)))
    return path.read_bytes()


def hexs(b: bytes) -> str:
    return " ".join(f"{x:02x}" for x in b)


def annotate(data: bytes) -> str:
    rows = []

    def row(off: int, n: int, what: str) -> None:
        chunk = data[off : off + n]
        shown = hexs(chunk) if n <= 12 else hexs(chunk[:12]) + " …"
        rows.append(f"| {off} | {n} | `{shown}` | {what} |")

    magic, major, minor, al, crc, n_kv, n_t, hlen, doff = struct.unpack_from("<4sHHIIQQQQ", data)
    row(0, 4, "magic `QCVT`")
    row(4, 2, f"major = {major}")
    row(6, 2, f"minor = {minor}")
    row(8, 4, f"alignment = {al}")
    row(12, 4, f"header_crc32 = 0x{crc:08X} (CRC-32 of bytes 48..{48 + hlen - 1})")
    row(16, 8, f"n_kv = {n_kv}")
    row(24, 8, f"n_tensors = {n_t}")
    row(32, 8, f"header_len = {hlen}")
    row(40, 8, f"data_offset = {doff}")
    p = 48
    row(p, 2, "key_len = 23"); p += 2
    row(p, 23, "key `qconvert.preamble_crc32`"); p += 23
    row(p, 1, "value_type = 1 (UINT64)"); p += 1
    row(p, 8, "value_len = 8"); p += 8
    (pcrc,) = struct.unpack_from("<Q", data, p)
    row(p, 8, f"value 0x{pcrc:08X}: CRC-32 of bytes 0..11 and 16..47"); p += 8
    row(p, 2, "key_len = 18"); p += 2
    row(p, 18, "key `model.architecture`"); p += 18
    row(p, 1, "value_type = 5 (STRING)"); p += 1
    row(p, 8, "value_len = 5"); p += 8
    row(p, 5, "value `llama`"); p += 5
    row(p, 2, "name_len = 1"); p += 2
    row(p, 1, "name `w`"); p += 1
    row(p, 1, "n_dims = 2"); p += 1
    row(p, 16, "dims = (1, 32)"); p += 16
    row(p, 2, "type_id = 8 (Q8_0)"); p += 2
    row(p, 8, "offset = 0"); p += 8
    row(p, 8, "nbytes = 34"); p += 8
    (tcrc,) = struct.unpack_from("<I", data, p)
    row(p, 4, f"crc32 = 0x{tcrc:08X} (of the 34 tensor bytes)"); p += 4
    row(p, 4, "params_len = 0"); p += 4
    assert p == 48 + hlen
    if doff > p:
        row(p, doff - p, "zero padding to data_offset")
    row(doff, 2, "tensor `w`, block 0: d = f16 `0x2408` ≈ 2/127 ≈ 0.015747")
    row(doff + 2, 32, "q[0..31] = −127, −119, …, 119 (int8)")
    row(doff + 34, len(data) - doff - 34, f"zero padding to a multiple of {al}; file size {len(data)}")
    return "\n".join(["| offset | size | bytes | field |", "|---:|---:|---|---|", *rows])


if __name__ == "__main__":
    data = write(HERE / "example.q")
    print(annotate(data))
