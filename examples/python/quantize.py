"""Quantize a model two ways and look inside the results (examples/shell/quantize.sh, in Python)."""

import os
from pathlib import Path

import qconvert

MODEL = os.environ.get("MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
WORK = Path(os.environ.get("WORK", "qconvert-example"))
WORK.mkdir(parents=True, exist_ok=True)

q8 = qconvert.quantize(MODEL, WORK / "model.q8", method="rtn", bits=8)
q4 = qconvert.quantize(MODEL, WORK / "model.q4_k_m", method="q4_k_m")
print(q8)
print(q4)

info = qconvert.inspect(WORK / "model.q4_k_m", verify=True)
print(info["source_quantization"], "->", info["totals"]["types"], f"{info['totals']['bits_per_weight']:.2f} bits per weight")
assert not info["corrupt_tensors"]

with qconvert.load(WORK / "model.q4_k_m") as c:  # memory-mapped; tensors are read when asked for
    name = next(n for n in c.tensors if n.endswith("mlp.down_proj.weight"))
    print(name, c.tensors[name].block_type.name, c.tensor(name).shape)
