#!/usr/bin/env bash
# README command (a), the main job: set up if needed, build the reference VLM (cached), quantize
# it with recipes/bivlm_vlm_w2.yaml (cached), measure P2 / P1 of both (cached), serve the packed
# checkpoint with `vllm serve` on 127.0.0.1 with visual-token pruning, ask it one easy-VQA test
# question with its image, time it against the bf16 model and print a summary table.
# Arguments go to `bivlm demo` (see `bivlm demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/bivlm" demo "$@"
