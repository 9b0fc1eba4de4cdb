#!/usr/bin/env bash
# Generate text from a quantized model on the CPU.
set -euo pipefail
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
WORK=${WORK:-qconvert-example}
mkdir -p "$WORK"

qconvert quantize "$MODEL" --method rtn --bits 8 -o "$WORK/model.q8" --force -q
qconvert run "$WORK/model.q8" --prompt "Once upon a time" --max-tokens 30
# sampling is reproducible: the same seed gives the same text
qconvert run "$WORK/model.q8" --prompt "Once upon a time" --max-tokens 30 --temperature 0.8 --top-p 0.95 --seed 1 --json
