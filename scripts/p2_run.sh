#!/usr/bin/env bash
# One row of the reference-VLM table (docs/RESULTS.md section 1b): quantize the reference VLM
# (`bivlm zoo build easyvqa-vlm`) with a recipe, then protocol P2 (easy-VQA test) and P1 of its
# language model.
#   bash scripts/p2_run.sh NAME RECIPE [--set key=value ...]     # NAME=fp: no quantization
# Writes out/p2/NAME/ (model + bivlm_report.json), out/p2/NAME.p2.json, out/p2/NAME.p1.json and
# out/p2/NAME.cmd. Extra arguments go to `bivlm quantize` (e.g. --calibration-text-tokens 0).
#
# GPTQ rows (a recipe named gptq_*) are quantized twice from the same calibration: once packed
# (pack-quantized, out/p2/NAME.packed/: its bivlm_report.json has the storage bits read from the
# files) and once saved dense (--fake-quant, out/p2/NAME/), which is what P2 and P1 evaluate:
# compressed-tensors 0.19 cannot load asymmetric pack-quantized checkpoints back into
# transformers ("Expected torch.int32 but got torch.int8, Aborting unpack.", README).
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
  FLAGS=()
  if [[ "$(basename "$RECIPE")" == gptq_* ]]; then
    "$BIVLM" quantize --model "$MODEL" --recipe "$RECIPE" --output "$OUT/$NAME.packed" \
      --overwrite "$@"
    FLAGS=(--fake-quant)
  fi
  "$BIVLM" quantize --model "$MODEL" --recipe "$RECIPE" --output "$DIR" --overwrite \
    ${FLAGS[@]+"${FLAGS[@]}"} "$@"
fi
"$BIVLM" eval vqa --model "$DIR" --json "$OUT/$NAME.p2.json"
"$BIVLM" eval ppl --model "$DIR" --json "$OUT/$NAME.p1.json"
