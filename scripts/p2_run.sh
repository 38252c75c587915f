#!/usr/bin/env bash
# One row of the reference-VLM table (docs/RESULTS.md section 1b): quantize the reference VLM
# (`bivlm zoo build easyvqa-vlm`) with a recipe, then protocol P2 (easy-VQA test) and P1 of its
# language model.
#   bash scripts/p2_run.sh NAME RECIPE [--set key=value ...]     # NAME=fp: no quantization
# Writes out/p2/NAME/ (model + bivlm_report.json), out/p2/NAME.p2.json, out/p2/NAME.p1.json and
# out/p2/NAME.cmd.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="$1"; RECIPE="${2:-}"; shift $(( $# >= 2 ? 2 : 1 ))
BIVLM="$ROOT/.venv/bin/bivlm"
MODEL="$("$BIVLM" zoo build easyvqa-vlm | tail -n 1)"
OUT="$ROOT/out/p2"
mkdir -p "$OUT"
echo "bash scripts/p2_run.sh $NAME $RECIPE $*" > "$OUT/$NAME.cmd"
if [[ "$NAME" == "fp" ]]; then
  DIR="$MODEL"
else
  DIR="$OUT/$NAME"
  "$BIVLM" quantize --model "$MODEL" --recipe "$RECIPE" --output "$DIR" --overwrite "$@"
fi
"$BIVLM" eval vqa --model "$DIR" --json "$OUT/$NAME.p2.json"
"$BIVLM" eval ppl --model "$DIR" --json "$OUT/$NAME.p1.json"
