#!/usr/bin/env bash
# Quantize, then fail (exit 3) when the mean KL divergence against the F32 reference exceeds MAX_KLD.
set -euo pipefail
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
TEXT=${TEXT:?set TEXT to an evaluation text, e.g. wikitext-2-raw/wiki.test.raw}
METHOD=${METHOD:-q4_k_m}
CHUNKS=${CHUNKS:-20}
MAX_KLD=${MAX_KLD:-0.1}
WORK=${WORK:-qconvert-example}
mkdir -p "$WORK"

qconvert quantize "$MODEL" --method f32 -o "$WORK/model.f32" --force -q        # the reference
qconvert quantize "$MODEL" --method "$METHOD" -o "$WORK/model.$METHOD" --force -q

status=0
qconvert eval "$WORK/model.$METHOD" --text "$TEXT" --chunks "$CHUNKS" \
    --reference "$WORK/model.f32" --max-kld "$MAX_KLD" || status=$?
case $status in
    0) echo "quality gate passed: $METHOD keeps the mean KLD under $MAX_KLD" ;;
    3) echo "quality gate failed: $METHOD is too far from the reference" >&2 ;;
esac
exit $status
