#!/usr/bin/env bash
# Quantize a model two ways and look inside the results.
set -euo pipefail
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
WORK=${WORK:-qconvert-example}
mkdir -p "$WORK"

# 8-bit round-to-nearest: Q8_0 blocks, byte-identical to llama.cpp's quantizer
qconvert quantize "$MODEL" --method rtn --bits 8 -o "$WORK/model.q8" --force

# a llama.cpp K-quant mix; --json prints a machine-readable summary
qconvert quantize "$MODEL" --method q4_k_m -o "$WORK/model.q4_k_m" --force --json

# header, provenance, recipe, tensor table; --verify checks every tensor's checksum
qconvert inspect "$WORK/model.q4_k_m" --verify
