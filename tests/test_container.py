"""Container v1: round trips, version rules, bounds, corruption and atomic writes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from qconvert.blocks import by_name
from qconvert.container import ContainerWriter, TensorSpec, open_container
from qconvert.container.format import FIXED_HEADER, MAGIC
from qconvert.errors import QConvertError

METADATA = {
    "an.int": -5,
    "a.big.uint": 2**63 + 7,
    "a.float": 0.125,
    "a.bool": True,
    "a.string": "héllo",
    "some.bytes": b"\x00\x01\xff",
    "a.json": {"b": [1, 2.5, None], "a": "x"},
}


def write_sample(path: Path, alignment: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    values = {
        "w.q8": rng.normal(size=(3, 64)).astype(np.float32),
        "w.q4": rng.normal(size=(2, 32)).astype(np.float32),
        "norm": rng.normal(size=(5,)).astype(np.float32),
        "w.f16": rng.normal(size=(2, 3)).astype(np.float32),
    }
    types = {"w.q8": "Q8_0", "w.q4": "Q4_0", "norm": "F32", "w.f16": "F16"}
    specs = [TensorSpec(n, v.shape, types[n]) for n, v in values.items()]
    with ContainerWriter(path, METADATA, specs, alignment=alignment) as w:
        for n, v in values.items():
            w.write(n, by_name(types[n]).quantize(v.reshape(-1, v.shape[-1])))
    return values


def test_round_trip_metadata_and_tensors(tmp_path):
    path = tmp_path / "m.q"
    values = write_sample(path)
    with open_container(path) as c:
        assert (c.major, c.minor, c.alignment) == (1, 0, 64)
        assert c.metadata == METADATA
        assert list(c.tensors) == list(values)
        np.testing.assert_array_equal(c.tensor("norm"), values["norm"])
        np.testing.assert_allclose(c.tensor("w.q8"), values["w.q8"], atol=np.abs(values["w.q8"]).max() / 127)
        assert c.tensor("w.f16").dtype == np.float32 and c.tensor("w.f16").shape == (2, 3)
        for info in c.tensors.values():
            assert (c.data_offset + info.offset) % 64 == 0
        assert c.raw("w.q8").shape == (3, 2 * 34)


def test_tensor_data_is_aligned_for_every_alignment(tmp_path):
    for alignment in (16, 4096):
        path = tmp_path / f"a{alignment}.q"
        write_sample(path, alignment=alignment)
        with open_container(path) as c:
            assert c.alignment == alignment and c.data_offset % alignment == 0
            assert all(i.offset % alignment == 0 for i in c.tensors.values())


def test_same_input_gives_identical_bytes(tmp_path):
    write_sample(tmp_path / "a.q")
    write_sample(tmp_path / "b.q")
    assert (tmp_path / "a.q").read_bytes() == (tmp_path / "b.q").read_bytes()


def _patch_header(path: Path, **fields) -> None:
    data = bytearray(path.read_bytes())
    names = ["magic", "major", "minor", "alignment", "header_crc", "n_kv", "n_tensors", "header_len", "data_offset"]
    values = dict(zip(names, FIXED_HEADER.unpack_from(data)))
    values.update(fields)
    FIXED_HEADER.pack_into(data, 0, *[values[n] for n in names])
    path.write_bytes(bytes(data))


def _rewrite_header_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_len = FIXED_HEADER.unpack_from(data)[7]
    struct.pack_into("<I", data, 12, zlib.crc32(data[48 : 48 + header_len]))
    path.write_bytes(bytes(data))


def test_unknown_major_version_is_refused(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    _patch_header(path, major=2)
    with pytest.raises(QConvertError, match="format 2.0; this qconvert reads format 1.x only - upgrade"):
        open_container(path)


def test_newer_minor_version_with_unknown_fields_is_read(tmp_path):
    """A 1.x reader ignores KV value types and per-tensor parameters it does not know."""
    path = tmp_path / "m.q"
    values = write_sample(path)
    data = bytearray(path.read_bytes())
    magic, major, minor, al, crc, n_kv, n_t, header_len, data_offset = FIXED_HEADER.unpack_from(data)
    key = b"future.thing"
    extra_kv = struct.pack("<H", len(key)) + key + struct.pack("<BQ", 200, 3) + b"abc"
    # insert the new KV entry at the start of the KV section and move the data section after it
    new_header = extra_kv + bytes(data[48 : 48 + header_len])
    new_data_offset = (48 + len(new_header) + al - 1) // al * al
    out = bytearray(FIXED_HEADER.pack(magic, major, 7, al, zlib.crc32(new_header), n_kv + 1, n_t, len(new_header), new_data_offset))
    out += new_header + b"\0" * (new_data_offset - 48 - len(new_header)) + data[data_offset:]
    path.write_bytes(bytes(out))
    with open_container(path) as c:
        assert c.minor == 7
        assert "future.thing" not in c.metadata and c.metadata["a.string"] == "héllo"
        np.testing.assert_array_equal(c.tensor("norm"), values["norm"])


def test_bad_magic(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    _patch_header(path, magic=b"GGUF")
    with pytest.raises(QConvertError, match="not a qconvert container"):
        open_container(path)


@pytest.mark.parametrize("keep", [10, 48, 100, 400])
def test_truncated_container(tmp_path, keep):
    path = tmp_path / "m.q"
    write_sample(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(QConvertError, match="truncated|too short|not a qconvert"):
        open_container(path)


def test_truncated_tensor_data(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(QConvertError, match="truncated container .* lies outside the file"):
        open_container(path)


def test_flipped_byte_in_a_tensor_is_detected(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    with open_container(path) as c:
        pos = c.data_offset + c.tensors["w.q4"].offset + 5
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with open_container(path) as c:
        assert c.verify() == ["w.q4"]
        c.tensor("w.q8")  # other tensors still read
        with pytest.raises(QConvertError, match="checksum mismatch in tensor 'w.q4'"):
            c.tensor("w.q4")


def test_flipped_byte_in_the_header_is_detected(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    data = bytearray(path.read_bytes())
    data[60] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(QConvertError, match="header checksum mismatch"):
        open_container(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_tensors", 10**15, "claims 1000000000000000 tensors"),
        ("n_kv", 10**12, "claims 1000000000000 metadata entries"),
        ("n_tensors", 900_000, "cannot fit"),
        ("header_len", 2**40, "header length"),
        ("data_offset", 2**50, "data offset"),
        ("alignment", 3, "alignment"),
    ],
)
def test_absurd_header_counts_are_refused_before_allocating(tmp_path, field, value, message):
    path = tmp_path / "m.q"
    write_sample(path)
    _patch_header(path, **{field: value})
    with pytest.raises(QConvertError, match=message):
        open_container(path)


def test_tensor_offset_outside_file(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    data = bytearray(path.read_bytes())
    # the first tensor entry follows the KV section; find its offset field via its name
    idx = data.index(b"w.q8") + 4 + 1 + 2 * 8 + 2
    struct.pack_into("<Q", data, idx, 2**40)
    path.write_bytes(bytes(data))
    _rewrite_header_crc(path)
    with pytest.raises(QConvertError, match="lies outside the file"):
        open_container(path)


def test_interrupted_write_leaves_no_output(tmp_path):
    path = tmp_path / "out.q"
    specs = [TensorSpec("a", (2, 32), "Q8_0"), TensorSpec("b", (2, 32), "Q8_0")]
    with pytest.raises(RuntimeError):
        with ContainerWriter(path, {}, specs) as w:
            w.write("a", by_name("Q8_0").quantize(np.ones((2, 32), np.float32)))
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_output(tmp_path):
    path = tmp_path / "out.q"
    path.write_bytes(b"previous")
    specs = [TensorSpec("a", (2, 32), "Q8_0")]
    with pytest.raises(QConvertError):
        with ContainerWriter(path, {}, specs) as w:
            w.write("a", np.zeros(10, np.uint8))  # wrong size
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.q"]


def test_missing_tensor_name_is_a_clear_error(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    with open_container(path) as c, pytest.raises(QConvertError, match="no tensor named 'nope'"):
        c.tensor("nope")


def test_magic_constant():
    assert MAGIC == b"QCVT" and FIXED_HEADER.size == 48
