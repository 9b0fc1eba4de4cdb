#!/usr/bin/env bash
# An importance matrix in llama.cpp's GGUF format (llama-quantize --imatrix reads it too),
# then a K-quant that uses it. A file from llama-imatrix (imatrix.gguf or imatrix.dat) works the same.
set -euo pipefail
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
TEXT=${TEXT:?set TEXT to a text file}
CALIB=${CALIB:-$TEXT}
CHUNKS=${CHUNKS:-20}
WORK=${WORK:-qconvert-example}
mkdir -p "$WORK"

qconvert imatrix "$MODEL" --calib "$CALIB" --chunks "$CHUNKS" -o "$WORK/imatrix.gguf" --force
qconvert quantize "$MODEL" --method q4_k_m --imatrix "$WORK/imatrix.gguf" -o "$WORK/model.q4_k_m" --force

# or in one step: --calib computes the importance matrix on the way
qconvert quantize "$MODEL" --method q4_k_m --calib "$CALIB" --chunks "$CHUNKS" -o "$WORK/model.q4_k_m.calib" --force
