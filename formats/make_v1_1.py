"""Write the v1.1 golden files (run once, when format 1.1 was released; never regenerate).

    python formats/make_v1_1.py formats/v1.1

Format 1.1 adds the fixed header's checksum (metadata ``qconvert.preamble_crc32``, FORMAT.md
§2). ``all-types.q``: one 2×256 tensor of every block type (with its params) and one metadata
value of every value type; ``tiny-llama-q4_0.q`` as in v1; ``act-order.q``: a group-wise tensor
with an ``input_perm`` permutation and an empty tensor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_v1 import describe, tiny_llama_file  # noqa: E402

from qconvert.blocks import all_types, by_name  # noqa: E402
from qconvert.container import ContainerWriter, TensorSpec  # noqa: E402


def all_types_file(path: Path) -> None:
    rng = np.random.default_rng(2027)
    values = rng.normal(0, 1, (2, 256)).astype(np.float32)
    values[0, 9] = 7.25  # an outlier
    values[1, 64:128] = 0.0  # an all-zero block (and sub-blocks)
    metadata = {
        "qconvert.version": "0.1.0",
        "golden.uint": 2**64 - 1,
        "golden.int": -(2**63),
        "golden.float": -0.1,
        "golden.bool": True,
        "golden.string": "naïve ✓",
        "golden.bytes": bytes(range(256)),
        "golden.json": {"list": [1, 2.5, "x", True, None], "nested": {"empty": {}}},
    }
    types = [t for t in all_types() if t.quantize_blocks is not None or t.quantize_rows is not None
             or t.quantize_tensor is not None]
    encoded = [t.quantize_with_params(values) for t in types]
    specs = [TensorSpec(f"tensor.{t.name.lower()}", values.shape, t.name, params)
             for t, (_, params) in zip(types, encoded)]
    with ContainerWriter(path, metadata, specs) as w:
        for s, (raw, _) in zip(specs, encoded):
            w.write(s.name, raw)


def act_order_file(path: Path) -> None:
    rng = np.random.default_rng(2026)
    values = rng.normal(0, 1, (4, 256)).astype(np.float32)
    perm = [int(i) for i in rng.permutation(256)]
    specs = [
        TensorSpec("tensor.i4g32.act_order", (4, 256), "I4G32", {"input_perm": perm}),
        TensorSpec("tensor.empty", (0, 32), "Q8_0"),
    ]
    with ContainerWriter(path, {"qconvert.version": "0.1.0"}, specs) as w:
        w.write("tensor.i4g32.act_order", by_name("I4G32").quantize(values[:, perm]))
        w.write("tensor.empty", np.zeros(0, np.uint8))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # golden files are never rewritten: only missing ones are made
    for name, make in (("all-types.q", all_types_file), ("tiny-llama-q4_0.q", tiny_llama_file),
                       ("act-order.q", act_order_file)):
        if not (out / name).exists():
            make(out / name)
    expected = {p.name: describe(p) for p in sorted(out.glob("*.q"))}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
