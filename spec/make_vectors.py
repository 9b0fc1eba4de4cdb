"""Write spec/vectors/<TYPE>.json: one small known-answer vector per registered block type.

Run from anywhere: ``python spec/make_vectors.py``. The output is deterministic (the inputs
are literals below), so re-running it must not change any file unless a codec changed.

Each file holds:
  type, id, block_size, type_size   - the registry entry
  shape                             - numpy shape of the input tensor (last axis = row)
  input                             - the float32 input, row-major; every number is written
                                      as the exact decimal of its float32 value
  bytes_hex                         - the quantized tensor, all rows concatenated, lower-case hex
  dequantized                       - decoding bytes_hex, row-major, exact float32 values

An implementation conforms if it turns ``input`` into exactly ``bytes_hex`` and decodes
``bytes_hex`` into exactly ``dequantized``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qconvert.blocks import BlockType, all_types  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "vectors"

# Block 0: gaussian-ish values (multiples of 1/256) with one outlier at element 3.
BLOCK_GAUSSIAN = [
    0.390625, 0.28125, -0.38671875, 4.3125, -0.0859375, 0.72265625, 0.80078125, 0.546875,
    0.20703125, 0.9609375, 0.73828125, -0.1328125, -0.63671875, -0.21875, -0.25390625, 0.4140625,
    -1.140625, -0.11328125, 1.00390625, -0.55078125, -0.45703125, -0.05078125, -0.8515625, -0.078125,
    -0.0078125, -0.00390625, -0.59375, -0.21875, 0.390625, -0.4296875, 0.328125, 0.39453125,
]  # fmt: skip

# Block 1: mixed signs and zeros; |max| = 3 occurs as -3.0 (element 6) before +3.0 (element 29),
# so the signed-max rule of Q4_0/Q5_0 must pick -3.0.
BLOCK_MIXED = [
    0.0, -1.5, 0.75, 0.0, -0.25, 2.0, -3.0, 0.0, 1.125, -0.625, 0.0, 0.5, -2.25, 0.0, 0.0625, -0.0625,
    0.0, 1.75, -1.0, 0.0, 2.5, -0.375, 0.0, 0.25, -2.75, 0.0, 1.0, -0.125, 0.0, 3.0, -1.25, 0.0,
]  # fmt: skip

# Float types: values that exercise rounding (0.1, 1/3), f16 and bf16 ties (1 + 2^-11 rounds down
# to even in f16; 1 + 2^-8 and 1 + 3*2^-8 are bf16 ties to even, down and up), the f16 maximum,
# an f16 subnormal and an f16 underflow to zero.
FLOAT_VALUES = [0.1, -1.0 / 3.0, 1.00048828125, 1.00390625, 1.01171875, 65504.0, -2.5e-05, 1e-08]


def _k_quant_rows() -> list[list[float]]:
    """Two 256-element super-blocks for the K-quants (exact float32 values): 32-element pieces
    with very different ranges, so the sub-block scales differ, plus the corner cases of the
    searches: an all-zero piece, a constant piece, all-positive and all-negative pieces, a
    tiny-magnitude piece and reversed / half-zero pieces."""
    g, m = BLOCK_GAUSSIAN, BLOCK_MIXED
    row0 = g + m + [-0.5 * v for v in g] + [0.25 * v for v in m] + [v / 1024 for v in g] + [0.0] * 32
    row0 += [abs(v) + 1 for v in g] + [-abs(v) for v in m]
    row1 = [0.75] * 32 + [8 * v for v in m] + [-v for v in g] + [0.0] * 16 + g[:16] + m[::-1]
    row1 += [abs(v) for v in g] + [0.125 * v for v in m] + g[::-1]
    return [row0, row1]


def vector_input(bt: BlockType) -> np.ndarray:
    if bt.block_size == 256 and (bt.name.endswith("_K") or bt.name == "IQ4_XS"):  # K-quants, IQ4_XS
        return np.array(_k_quant_rows(), dtype=np.float32)
    if bt.name == "W8A8":  # int8 rows with a scale per row (params): the two 32-value blocks as rows
        return np.array([BLOCK_GAUSSIAN, BLOCK_MIXED], dtype=np.float32)
    if bt.block_size == 1:
        return np.array(FLOAT_VALUES, dtype=np.float32)
    if bt.block_size == 32:
        return np.array([BLOCK_GAUSSIAN, BLOCK_MIXED], dtype=np.float32)
    if bt.block_size % 32 == 0:
        # wider blocks (64, 128, ...): two rows of one block each, cycling through the two
        # 32-element blocks and exactly scaled copies of them (row 1 starts one piece later)
        pieces = [BLOCK_GAUSSIAN, BLOCK_MIXED, [-0.5 * v for v in BLOCK_GAUSSIAN], [0.25 * v for v in BLOCK_MIXED]]
        k = bt.block_size // 32
        rows = [[v for i in range(k) for v in pieces[(i + r) % 4]] for r in range(2)]
        return np.array(rows, dtype=np.float32)
    raise NotImplementedError(f"no spec vector input defined for block size {bt.block_size} ({bt.name})")


def exact_floats(values: np.ndarray) -> list[float]:
    """float32 values as Python floats: repr() of each is the exact (shortest-double) decimal."""
    out = [float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1)]
    if not all(np.isfinite(out)):
        raise ValueError("spec vectors must hold finite values only (JSON has no inf/NaN)")
    return out


def make_vector(bt: BlockType) -> dict:
    x = vector_input(bt)
    raw, params = bt.quantize_with_params(x)
    deq = bt.dequantize(raw, x.shape, params)
    vector = {
        "type": bt.name,
        "id": bt.id,
        "block_size": bt.block_size,
        "type_size": bt.type_size,
        "shape": list(x.shape),
        "input": exact_floats(x),
        "bytes_hex": raw.tobytes().hex(),
        "dequantized": exact_floats(deq),
    }
    if params:  # types whose tensors carry params (FORMAT.md §4): the tensor entry's params
        vector["params"] = params
    return vector


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for bt in all_types():
        if bt.quantize_blocks is None and bt.quantize_tensor is None:
            continue  # read-only types get hand-made vectors
        path = OUT_DIR / f"{bt.name}.json"
        vector = make_vector(bt)
        # one field per line, each list on one line: small diffs, easy to read
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in vector.items())
        path.write_text("{\n" + body + "\n}\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
