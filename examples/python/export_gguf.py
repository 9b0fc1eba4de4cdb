"""Export a quantized container to GGUF for llama.cpp (examples/shell/export_gguf.sh, in Python)."""

import os
from pathlib import Path

import qconvert

MODEL = os.environ.get("MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
WORK = Path(os.environ.get("WORK", "qconvert-example"))
WORK.mkdir(parents=True, exist_ok=True)

qconvert.quantize(MODEL, WORK / "model.q4_k_m", method="q4_k_m")
x = qconvert.export(WORK / "model.q4_k_m", WORK / "model.Q4_K_M.gguf")  # blocks copied, not re-quantized
print(x)
print(x.summary["types"])
