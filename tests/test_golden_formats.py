"""Every released format version's golden files are still read exactly (formats/README.md)."""

from __future__ import annotations

import hashlib
import json

import pytest

import qconvert
from tests.conftest import REPO

GOLDEN = sorted((REPO / "formats").glob("v*/expected.json"))


def _cases():
    for expected_file in GOLDEN:
        for name, expected in json.loads(expected_file.read_text()).items():
            yield pytest.param(expected_file.parent / name, expected, id=f"{expected_file.parent.name}/{name}")


def test_there_are_golden_files():
    assert GOLDEN, "formats/v*/expected.json missing"


@pytest.mark.parametrize("path,expected", list(_cases()))
def test_golden_file_reads_exactly(path, expected):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected["file_sha256"], "golden files must never change"
    with qconvert.load(path) as c:
        assert f"{c.major}.{c.minor}" == expected["format_version"]
        assert c.verify() == []
        meta = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in c.metadata.items() if k != "source"}
        assert meta == expected["metadata"]
        assert set(c.tensors) == set(expected["tensors"])
        for name, t in expected["tensors"].items():
            info = c.tensors[name]
            assert list(info.shape) == t["shape"] and info.block_type.name == t["type"]
            assert info.extra == t.get("params", {}), name
            assert hashlib.sha256(c.raw(name).tobytes()).hexdigest() == t["raw_sha256"]
            values = c.tensor(name).astype("<f4").tobytes()
            assert hashlib.sha256(values).hexdigest() == t["dequantized_sha256"], name


def test_format_md_example_file(tmp_path):
    """spec/example.q is what FORMAT.md §11 dissects, and today's writer still writes it."""
    import sys

    sys.path.insert(0, str(REPO / "spec"))
    import make_example

    example = (REPO / "spec" / "example.q").read_bytes()
    assert make_example.write(tmp_path / "e.q") == example
    table = make_example.annotate(example)
    assert table in (REPO / "FORMAT.md").read_text()
    with qconvert.load(REPO / "spec" / "example.q") as c:
        assert c.metadata == {"model.architecture": "llama"}
        assert c.tensor("w").tolist() == [[q * 0.0157470703125 for q in c.raw("w").view("i1")[0, 2:].tolist()]]
