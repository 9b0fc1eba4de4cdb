"""Write the v1 golden files (run once, when format 1.0 was released; never regenerate).

    python formats/make_v1.py formats/v1

The files it wrote are committed in formats/v1/ with expected.json; tests/test_golden_formats.py
reads them with the current code, so every later qconvert keeps reading format 1.0.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert.blocks import all_types  # noqa: E402
from qconvert.container import ContainerWriter, TensorSpec, open_container  # noqa: E402


def all_types_file(path: Path) -> None:
    """One 2x64 tensor per block type (F32..Q5_1), plus one metadata value of every type."""
    rng = np.random.default_rng(2024)
    values = rng.normal(0, 1, (2, 64)).astype(np.float32)
    values[0, 5] = 9.5  # an outlier
    values[1, 32:] = 0.0  # an all-zero block
    metadata = {
        "qconvert.version": "0.1.0",
        "golden.uint": 2**63 + 1,
        "golden.int": -42,
        "golden.float": 1.5,
        "golden.bool": False,
        "golden.string": "größe",
        "golden.bytes": bytes(range(8)),
        "golden.json": {"list": [1, 2, 3], "nested": {"x": None}},
    }
    types = [t for t in all_types() if t.quantize_blocks is not None]
    specs = [TensorSpec(f"tensor.{t.name.lower()}", values.shape, t.name) for t in types]
    with ContainerWriter(path, metadata, specs) as w:
        for t, s in zip(types, specs):
            w.write(s.name, t.quantize(values))


def more_types_file(path: Path) -> None:
    """Block types added before format 1.0 was released, after all-types.q was written:
    K-quants, NF4/NF4_DQ (with params), group-wise integers, W8A8 (with params). Rows of 256."""
    rng = np.random.default_rng(2025)
    values = rng.normal(0, 1, (2, 256)).astype(np.float32)
    values[0, 7] = -6.5
    values[1, 128:160] = 0.0
    done = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
    types = [t for t in all_types() if t.name not in done and t.name != "Q8_K"]
    encoded = [t.quantize_with_params(values) for t in types]
    specs = [TensorSpec(f"tensor.{t.name.lower()}", values.shape, t.name, params) for t, (_, params) in zip(types, encoded)]
    with ContainerWriter(path, {"qconvert.version": "0.1.0"}, specs) as w:
        for s, (raw, _) in zip(specs, encoded):
            w.write(s.name, raw)


def tiny_llama_file(path: Path) -> None:
    from tests.conftest import make_hf_folder
    import tempfile

    import qconvert

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_hf_folder(Path(tmp) / "tiny-llama")
        qconvert.quantize(folder, path, method="rtn", bits=4, sym=True)


def describe(path: Path) -> dict:
    with open_container(path) as c:
        meta = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in c.metadata.items() if k != "source"}
        params = {name: info.extra for name, info in c.tensors.items() if info.extra}
        return {
            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "format_version": f"{c.major}.{c.minor}",
            "metadata": meta,
            "tensors": {
                name: {
                    "shape": list(info.shape),
                    "type": info.block_type.name,
                    "raw_sha256": hashlib.sha256(c.raw(name).tobytes()).hexdigest(),
                    "dequantized_sha256": hashlib.sha256(c.tensor(name).astype("<f4").tobytes()).hexdigest(),
                    **({"params": params[name]} if name in params else {}),
                }
                for name, info in c.tensors.items()
            },
        }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # golden files are never rewritten: only missing ones are made
    for name, make in (("all-types.q", all_types_file), ("tiny-llama-q4_0.q", tiny_llama_file),
                       ("more-types.q", more_types_file)):
        if not (out / name).exists():
            make(out / name)
    expected = {p.name: describe(p) for p in sorted(out.glob("*.q"))}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
