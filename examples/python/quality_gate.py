"""Quantize, then fail when the mean KL divergence against the F32 reference exceeds MAX_KLD
(examples/shell/quality_gate.sh, in Python)."""

import os
import sys
from pathlib import Path

import qconvert

MODEL = os.environ.get("MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
TEXT = os.environ["TEXT"]  # an evaluation text, e.g. wikitext-2-raw/wiki.test.raw
METHOD = os.environ.get("METHOD", "q4_k_m")
CHUNKS = int(os.environ.get("CHUNKS", "20"))
MAX_KLD = float(os.environ.get("MAX_KLD", "0.1"))
WORK = Path(os.environ.get("WORK", "qconvert-example"))
WORK.mkdir(parents=True, exist_ok=True)

qconvert.quantize(MODEL, WORK / "model.f32", method="f32")
qconvert.quantize(MODEL, WORK / f"model.{METHOD}", method=METHOD)
result = qconvert.evaluate(WORK / f"model.{METHOD}", TEXT, reference=WORK / "model.f32", chunks=CHUNKS)
print(result)
if result.reference["kld_mean"] > MAX_KLD:
    print(f"quality gate failed: mean KLD {result.reference['kld_mean']:.5f} > {MAX_KLD}", file=sys.stderr)
    sys.exit(3)
print(f"quality gate passed: {METHOD} keeps the mean KLD under {MAX_KLD}")
