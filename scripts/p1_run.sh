#!/usr/bin/env bash
# One row of the P1 table: quantize the reference LM with a recipe, then evaluate it.
#   bash scripts/p1_run.sh NAME RECIPE [--set key=value ...]
#   P1_MODEL=gemma3-270m bash scripts/p1_run.sh ...   (another `bivlm zoo` model; default smollm2-135m)
# Writes out/p1/NAME/ (the model and bivlm_report.json) and out/p1/NAME.json (P1 result).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="$1"; RECIPE="$2"; shift 2
BIVLM="$ROOT/.venv/bin/bivlm"
MODEL="$("$BIVLM" zoo build "${P1_MODEL:-smollm2-135m}" | tail -n 1)"
mkdir -p "$ROOT/out/p1"
echo "${P1_MODEL:+P1_MODEL=$P1_MODEL }bash scripts/p1_run.sh $NAME $RECIPE $*" > "$ROOT/out/p1/$NAME.cmd"
"$BIVLM" quantize --model "$MODEL" --recipe "$RECIPE" --output "$ROOT/out/p1/$NAME" --overwrite "$@"
"$BIVLM" eval ppl --model "$ROOT/out/p1/$NAME" --json "$ROOT/out/p1/$NAME.json"
