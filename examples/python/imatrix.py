"""An importance matrix in llama.cpp's GGUF format, then a K-quant that uses it
(examples/shell/imatrix.sh, in Python)."""

import os
from pathlib import Path

import qconvert

MODEL = os.environ.get("MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
CALIB = os.environ.get("CALIB") or os.environ["TEXT"]
CHUNKS = int(os.environ.get("CHUNKS", "20"))
WORK = Path(os.environ.get("WORK", "qconvert-example"))
WORK.mkdir(parents=True, exist_ok=True)

m = qconvert.imatrix(MODEL, CALIB, WORK / "imatrix.gguf", chunks=CHUNKS)  # .dat: llama.cpp's legacy format
print(m)
r = qconvert.quantize(MODEL, WORK / "model.q4_k_m", method="q4_k_m", imatrix=WORK / "imatrix.gguf")
with qconvert.load(r.output) as c:
    print("imatrix recorded in the recipe:", c.recipe["imatrix"]["format"], c.recipe["imatrix"]["chunks"], "windows")
