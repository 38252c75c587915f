#!/usr/bin/env bash
# Set up .venv if needed, build the reference LM and print its P1 perplexity.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
BIVLM="$ROOT/.venv/bin/bivlm"
MODEL="$("$BIVLM" zoo build smollm2-135m | tail -n 1)"
echo "[demo] reference model: $MODEL"
"$BIVLM" eval ppl --model "$MODEL" --json "${BIVLM_DEMO_JSON:-$ROOT/demo_ppl.json}"
