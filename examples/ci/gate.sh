#!/usr/bin/env bash
# Convert MODEL with METHOD, stop (exit 3) when its mean KL divergence against the F32 reference
# exceeds MAX_KLD, and export the GGUF to publish. Used by quantize-gate-publish.yml; runs
# anywhere qconvert is installed.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a hub id, a Hugging Face folder or a .gguf file}
TEXT=${TEXT:?set TEXT to the evaluation text, e.g. wikitext-2-raw/wiki.test.raw}
CALIB=${CALIB:-}                # calibration text for the importance matrix (none: no imatrix)
METHOD=${METHOD:-q4_k_m}
CHUNKS=${CHUNKS:-20}
MAX_KLD=${MAX_KLD:-0.1}
WORK=${WORK:-out}
mkdir -p "$WORK"
name=$(basename "$MODEL" .gguf)

qconvert quantize "$MODEL" --method f32 -o "$WORK/$name.f32" --force
calib=()
if [ -n "$CALIB" ]; then calib=(--calib "$CALIB" --chunks "$CHUNKS"); fi
qconvert quantize "$MODEL" --method "$METHOD" ${calib[@]+"${calib[@]}"} -o "$WORK/$name.$METHOD" --force

# the gate: exit code 3 (and no GGUF) when the quantized model is too far from the reference
qconvert eval "$WORK/$name.$METHOD" --text "$TEXT" --chunks "$CHUNKS" \
    --reference "$WORK/$name.f32" --max-kld "$MAX_KLD" --json > "$WORK/eval.json"

gguf="$WORK/$name.$(echo "$METHOD" | tr '[:lower:]' '[:upper:]').gguf"
qconvert export "$WORK/$name.$METHOD" --to gguf -o "$gguf" --force
rm "$WORK/$name.f32"  # the reference is not published
echo "$gguf"
