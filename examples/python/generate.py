"""Generate text from a quantized model on the CPU (examples/shell/generate.sh, in Python)."""

import os
import sys
from pathlib import Path

import qconvert

MODEL = os.environ.get("MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
WORK = Path(os.environ.get("WORK", "qconvert-example"))
WORK.mkdir(parents=True, exist_ok=True)

qconvert.quantize(MODEL, WORK / "model.q8", method="rtn", bits=8)
g = qconvert.generate(WORK / "model.q8", "Once upon a time", max_tokens=30, on_text=sys.stdout.write)
print()
print(g)
# sampling is reproducible: the same seed gives the same text
a = qconvert.generate(WORK / "model.q8", "Once upon a time", max_tokens=30, temperature=0.8, top_p=0.95, seed=1)
b = qconvert.generate(WORK / "model.q8", "Once upon a time", max_tokens=30, temperature=0.8, top_p=0.95, seed=1)
assert a.text == b.text
