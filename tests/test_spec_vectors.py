"""The known-answer vectors in spec/vectors/ (written by spec/make_vectors.py) still hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qconvert.blocks import all_types, by_name

VECTOR_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_vector_dir_is_populated():
    assert VECTOR_FILES, f"no vectors in {VECTOR_DIR}; run `python spec/make_vectors.py`"


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_vector(path: Path):
    vec = _load(path)
    bt = by_name(vec["type"])
    assert path.stem == bt.name
    assert (vec["id"], vec["block_size"], vec["type_size"]) == (bt.id, bt.block_size, bt.type_size)

    shape = tuple(vec["shape"])
    x = np.array(vec["input"], dtype=np.float64)
    # every input number is the exact value of a float32
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x)
    x = x.astype(np.float32).reshape(shape)

    expected = bytes.fromhex(vec["bytes_hex"])
    assert len(expected) == bt.nbytes(shape)
    params = vec.get("params")  # types whose tensors carry params (FORMAT.md §4)
    if bt.quantize_blocks is not None:
        assert bt.quantize(x).tobytes().hex() == vec["bytes_hex"]
    elif bt.quantize_tensor is not None:
        raw, got_params = bt.quantize_with_params(x)
        assert raw.tobytes().hex() == vec["bytes_hex"] and got_params == params

    deq = bt.dequantize(np.frombuffer(expected, dtype=np.uint8), shape, params)
    want = np.array(vec["dequantized"], dtype=np.float64)
    assert np.array_equal(want.astype(np.float32).astype(np.float64), want)
    assert deq.dtype == np.float32
    # compare bit patterns: also pins the sign of zeros
    assert np.array_equal(deq.reshape(-1).view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_every_registered_type_has_a_vector():
    have = {p.stem for p in VECTOR_FILES}
    missing = [bt.name for bt in all_types() if bt.name not in have]
    assert not missing, f"no spec vector for {missing}; run `python spec/make_vectors.py`"
