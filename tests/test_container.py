"""Container v1: round trips, version rules, bounds, corruption and atomic writes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from qconvert.blocks import by_name
from qconvert.container import ContainerWriter, TensorSpec, open_container
from qconvert.container.format import FIXED_HEADER, MAGIC, PREAMBLE_CRC_KEY, preamble_crc
from qconvert.errors import QConvertError
from tests.conftest import REPO

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
        assert (c.major, c.minor, c.alignment) == (1, 1, 64)
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
    path.write_bytes(reseal(path.read_bytes()))


def reseal(data: bytes) -> bytes:
    """Recompute the checksums of an edited header (the preamble's, then the header's), as a
    writer that meant the edit would."""
    data = bytearray(data)
    header_len = FIXED_HEADER.unpack_from(data)[7]
    key = PREAMBLE_CRC_KEY.encode()
    at = data.find(struct.pack("<H", len(key)) + key + struct.pack("<BQ", 1, 8), 48, 48 + header_len)
    if at >= 0:
        struct.pack_into("<Q", data, at + 2 + len(key) + 9, preamble_crc(data[:48]))
    struct.pack_into("<I", data, 12, zlib.crc32(data[48 : 48 + header_len]))
    return bytes(data)


def test_unknown_major_version_is_refused(tmp_path):
    path = tmp_path / "m.q"
    write_sample(path)
    _patch_header(path, major=2)
    with pytest.raises(QConvertError, match="format 2.1; this qconvert reads format 1.x only - upgrade"):
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
    path.write_bytes(reseal(out))
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


# -- the fixed header, exact entry lengths, hostile content with valid checksums (issue #14 B.1, B.7, B.8)


def _tiny_llama_container(tmp_path: Path) -> Path:
    from qconvert.convert import quantize
    from tests.conftest import make_hf_folder

    out = tmp_path / "m.q"
    quantize(make_hf_folder(tmp_path / "hf"), out, method="rtn", bits=8)
    return out


def test_every_byte_of_the_fixed_header_is_protected(tmp_path):
    """Format 1.1: changing any of the 48 fixed-header bytes (n_tensors 20 -> 2 dropped 18
    tensors silently in 1.0) is refused on open, or by --verify."""
    path = _tiny_llama_container(tmp_path)
    good = path.read_bytes()
    with open_container(path) as c:
        assert len(c.tensors) == 20 and c.verify() == []
    for pos in range(48):
        for flip in (0x01, 0x80):
            data = bytearray(good)
            data[pos] ^= flip
            path.write_bytes(bytes(data))
            try:
                with open_container(path) as c:
                    bad = c.verify()
            except QConvertError:
                continue
            raise AssertionError(f"byte {pos} ^ {flip:#x} was accepted (verify: {bad})")


def test_a_1_0_file_with_a_wrong_tensor_count_is_refused():
    """A 1.0 file has no preamble checksum; its entries must still end exactly at header_len."""
    golden = REPO / "formats" / "v1" / "tiny-llama-q4_0.q"
    data = bytearray(golden.read_bytes())
    struct.pack_into("<Q", data, 24, 2)  # n_tensors 20 -> 2
    with pytest.raises(QConvertError, match="2 tensor entries end at byte .* the header says they end at byte"):
        _open_bytes(bytes(data))


def _open_bytes(data: bytes):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.q"
        path.write_bytes(data)
        with open_container(path) as c:
            return c.metadata, {n: c.tensor(n) for n in c.tensors}


def test_nonzero_header_padding_is_refused(tmp_path):
    path = _tiny_llama_container(tmp_path)
    data = bytearray(path.read_bytes())
    header_len, data_offset = FIXED_HEADER.unpack_from(data)[7:9]
    assert data_offset > 48 + header_len
    data[48 + header_len] = 1
    with pytest.raises(QConvertError, match="between the header and the data section are not zero"):
        _open_bytes(bytes(data))


def test_a_1_1_file_without_its_preamble_checksum_is_refused(tmp_path):
    """The writer's preamble entry renamed: the file claims 1.1 but carries no checksum."""
    path = _tiny_llama_container(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(PREAMBLE_CRC_KEY.encode())
    data[at : at + 8] = b"qconvery"
    with pytest.raises(QConvertError, match="format 1.1 needs metadata 'qconvert.preamble_crc32'"):
        _open_bytes(reseal(data))


def _rewrite_entry(data: bytes, edit) -> bytes:
    """Rebuild a container after ``edit(metadata_entries, tensor_entries)`` changes the parsed
    entries (lists of dicts), with valid checksums: hostile content a CRC cannot catch."""
    magic, major, minor, al, _crc, n_kv, n_t, header_len, data_offset = FIXED_HEADER.unpack_from(data)
    pos, kvs, tensors = 48, [], []
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<H", data, pos)
        key = data[pos + 2 : pos + 2 + klen].decode()
        vtype, vlen = struct.unpack_from("<BQ", data, pos + 2 + klen)
        start = pos + 2 + klen + 9
        kvs.append({"key": key, "type": vtype, "value": data[start : start + vlen]})
        pos = start + vlen
    for _ in range(n_t):
        (nlen,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + nlen].decode()
        pos += 2 + nlen
        (nd,) = struct.unpack_from("<B", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 1))
        pos += 1 + 8 * nd
        type_id, off, nbytes, crc, plen = struct.unpack_from("<HQQII", data, pos)
        pos += 26
        tensors.append({"name": name, "dims": dims, "type": type_id, "offset": off, "nbytes": nbytes, "crc": crc,
                        "params": data[pos : pos + plen]})
        pos += plen
    edit(kvs, tensors)
    header = b""
    for kv in kvs:
        k = kv["key"].encode()
        header += struct.pack("<H", len(k)) + k + struct.pack("<BQ", kv["type"], len(kv["value"])) + kv["value"]
    for t in tensors:
        n = t["name"].encode()
        header += struct.pack("<H", len(n)) + n + struct.pack("<B", len(t["dims"])) + struct.pack(f"<{len(t['dims'])}Q", *t["dims"])
        header += struct.pack("<HQQII", t["type"], t["offset"], t["nbytes"], t["crc"], len(t["params"])) + t["params"]
    new_offset = (48 + len(header) + al - 1) // al * al
    out = FIXED_HEADER.pack(magic, major, minor, al, 0, len(kvs), len(tensors), len(header), new_offset)
    out += header + b"\0" * (new_offset - 48 - len(header)) + data[data_offset:]
    return reseal(out)


def _set_kv(key: str, vtype: int, value: bytes):
    def edit(kvs, tensors):
        for kv in kvs:
            if kv["key"] == key:
                kv["type"], kv["value"] = vtype, value
                return
        kvs.append({"key": key, "type": vtype, "value": value})

    return edit


@pytest.mark.parametrize(
    "key,vtype,value,message",
    [
        ("model.config", 6, b"\x00\x01", "metadata 'model.config' is BYTES; FORMAT.md §8 makes it a JSON object"),
        ("recipe", 7, b"[1, 2]", "metadata 'recipe' is JSON list; FORMAT.md §8 makes it a JSON object"),
        ("model.architecture", 7, b'"llama"', "'model.architecture' is JSON; FORMAT.md §8 makes it STRING"),
        ("source", 7, "deep", "nests more than 64 levels deep"),
        ("source", 7, b'{"a": NaN}', "holds the number NaN, which JSON does not allow"),
        ("source", 7, b'{"a": 1e999}', "holds the number 1e999"),
        ("source", 7, b'{"a": 1, "a": 2}', "has the key 'a' twice"),
        ("source", 7, b'{"a": "\xff"}', "is not UTF-8 text"),
        ("source", 7, b'{"a": "\\ud800"}', "holds the lone surrogate \\\\ud800"),
        ("x.float", 3, struct.pack("<d", float("nan")), "metadata value of 'x.float' is malformed"),
        ("x.bool", 4, b"\x02", "metadata value of 'x.bool' is malformed"),
        ("x.json", 7, "huge", "too large to load: 16,000,003 bytes of JSON would take about"),
    ],
    ids=["bytes-config", "list-recipe", "json-architecture", "deep", "nan", "overflow-inf", "duplicate-key",
         "not-utf8", "lone-surrogate", "nan-float64", "bool-2", "amplifying-json"],
)
def test_hostile_metadata_with_valid_checksums_is_refused(tmp_path, key, vtype, value, message):
    value = {"deep": b"[" * 100_000 + b"]" * 100_000, "huge": b"[" + b"1," * 8_000_000 + b"1]"}.get(value, value)
    path = _tiny_llama_container(tmp_path)
    data = _rewrite_entry(path.read_bytes(), _set_kv(key, vtype, value))
    with pytest.raises(QConvertError, match=message):
        _open_bytes(data)


def test_json_of_the_whole_file_shares_one_memory_budget(tmp_path):
    """Many values each under the limit are refused together (memory stays bounded)."""
    blob = b"[" + b"1," * 1_200_000 + b"1]"  # about 100 MiB of objects each, 2.4 MB of text

    def edit(kvs, tensors):
        kvs.extend({"key": f"x.{i}", "type": 7, "value": blob} for i in range(6))

    path = _tiny_llama_container(tmp_path)
    with pytest.raises(QConvertError, match="with the rest of the file's JSON"):
        _open_bytes(_rewrite_entry(path.read_bytes(), edit))


def _set_params(name: str, params: bytes):
    def edit(kvs, tensors):
        for t in tensors:
            if t["name"] == name:
                t["params"] = params

    return edit


@pytest.mark.parametrize(
    "params,message",
    [
        (b"[1, 2, 3]", "params of tensor 'model.layers.0.mlp.up_proj.weight' are not a JSON object"),
        (b'{"input_perm": "garbage"}', "input_perm that is not a permutation of its 64 columns"),
        (b'{"input_perm": [0, 0]}', "input_perm that is not a permutation"),
        ("float-in-perm", "input_perm that is not a permutation"),
    ],
    ids=["list", "string-perm", "short-perm", "float-in-perm"],
)
def test_hostile_params_are_refused(tmp_path, params, message):
    if params == "float-in-perm":
        params = b'{"input_perm": [' + b",".join(b"%d" % i for i in range(63)) + b", 1.5]}"
    path = _tiny_llama_container(tmp_path)
    data = _rewrite_entry(path.read_bytes(), _set_params("model.layers.0.mlp.up_proj.weight", params))
    with pytest.raises(QConvertError, match=message):
        _open_bytes(data)


def test_unknown_params_keys_make_only_that_tensor_unreadable(tmp_path):
    """FORMAT.md §4: params keys are must-understand."""
    path = _tiny_llama_container(tmp_path)
    data = _rewrite_entry(path.read_bytes(), _set_params("model.layers.0.mlp.up_proj.weight", b'{"future_rotation": 3}'))
    path.write_bytes(data)
    with open_container(path) as c:
        c.tensor("model.layers.0.mlp.down_proj.weight")
        with pytest.raises(QConvertError, match="params this qconvert does not understand \\(future_rotation\\)"):
            c.tensor("model.layers.0.mlp.up_proj.weight")


def test_dimensions_whose_product_wraps_int64_are_refused(tmp_path):
    """2^32 x 2^32 rows of 32 wraps int64 to 0 parameters; Python ints see the real size."""
    path = _tiny_llama_container(tmp_path)

    def edit(kvs, tensors):
        t = next(t for t in tensors if t["name"] == "model.layers.0.mlp.up_proj.weight")
        t["dims"] = [2**32, 2**32, 64]

    with pytest.raises(QConvertError, match="has 8704 bytes, its shape and type need"):
        _open_bytes(_rewrite_entry(path.read_bytes(), edit))


def test_empty_tensors_and_empty_names(tmp_path):
    path = _tiny_llama_container(tmp_path)

    def empty_name(kvs, tensors):
        tensors[0]["name"] = ""

    with pytest.raises(QConvertError, match="a tensor name is empty"):
        _open_bytes(_rewrite_entry(path.read_bytes(), empty_name))


# -- atomic output (issue #14 C: a SIGKILL leaves no partial output and no litter) --------------


def test_the_output_has_no_name_until_it_is_complete(tmp_path):
    from qconvert import atomicfile

    if not atomicfile._nameless_supported(tmp_path):
        pytest.skip("this file system cannot name an O_TMPFILE file; the named temporary is used")
    specs = [TensorSpec("a", (2, 32), "Q8_0")]
    w = ContainerWriter(tmp_path / "out.q", {}, specs)
    w.write("a", by_name("Q8_0").quantize(np.ones((2, 32), np.float32)))
    assert list(tmp_path.iterdir()) == []  # a kill now leaves nothing
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["out.q"]
    with open_container(tmp_path / "out.q") as c:
        assert c.verify() == []


def test_named_temporary_fallback_is_atomic_too(tmp_path, monkeypatch):
    from qconvert import atomicfile

    monkeypatch.setattr(atomicfile, "_nameless_supported", lambda folder: False)
    (tmp_path / "out.q").write_bytes(b"previous")
    specs = [TensorSpec("a", (2, 32), "Q8_0")]
    w = ContainerWriter(tmp_path / "out.q", {}, specs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.q.tmp-{__import__('os').getpid()}", "out.q"]
    w.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["out.q"] and (tmp_path / "out.q").read_bytes() == b"previous"
    with ContainerWriter(tmp_path / "out.q", {}, specs) as w:
        w.write("a", by_name("Q8_0").quantize(np.ones((2, 32), np.float32)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.q"]
    with open_container(tmp_path / "out.q") as c:
        assert c.verify() == []


def test_empty_tensor_with_dims_no_array_can_have_is_refused(tmp_path):
    """Found by the fuzzer: dims (2^40, 2^40, 0) make nbytes 0, pass every size check, then
    numpy cannot make the array ("array is too big")."""
    path = _tiny_llama_container(tmp_path)

    def edit(kvs, tensors):
        t = next(t for t in tensors if t["name"] == "model.norm.weight")
        t["dims"], t["nbytes"] = [2**40, 2**40, 0], 0

    with pytest.raises(QConvertError, match="has dimensions \\[1099511627776, 1099511627776, 0\\] no array can have"):
        _open_bytes(_rewrite_entry(path.read_bytes(), edit))


def test_stored_onnx_graph_with_text_that_is_not_utf8_is_refused(tmp_path):
    """Found by the fuzzer: protobuf returns an invalid-UTF-8 op_type as bytes (ONNX is proto2)."""
    onnx = pytest.importorskip("onnx")
    from qconvert.onnx import onnx_summary
    from tests.test_onnx import tiny_model

    import qconvert

    onnx.save(tiny_model(), str(tmp_path / "m.onnx"))
    qconvert.quantize(tmp_path / "m.onnx", tmp_path / "m.q")
    data = (tmp_path / "m.q").read_bytes()
    i = data.index(b"Relu")
    (tmp_path / "bad.q").write_bytes(reseal(data[:i] + b"\xffelu" + data[i + 4 :]))
    with open_container(tmp_path / "bad.q") as c, pytest.raises(QConvertError, match="NodeProto.op_type that is not UTF-8"):
        onnx_summary(c)
