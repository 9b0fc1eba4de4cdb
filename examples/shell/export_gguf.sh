#!/usr/bin/env bash
# Export a quantized container to GGUF for llama.cpp: the blocks are copied, not re-quantized.
set -euo pipefail
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
WORK=${WORK:-qconvert-example}
mkdir -p "$WORK"

qconvert quantize "$MODEL" --method q4_k_m -o "$WORK/model.q4_k_m" --force -q
qconvert export "$WORK/model.q4_k_m" --to gguf -o "$WORK/model.Q4_K_M.gguf" --force
# then, with llama.cpp:  llama-cli -m "$WORK/model.Q4_K_M.gguf" -p "Once upon a time"
