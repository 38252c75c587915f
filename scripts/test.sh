#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite CI runs: tests/ (unit) and integration_tests/
# (end to end: tiny models through llm-compressor, transformers and vLLM offline and served).
# Arguments go to pytest instead, e.g. `bash scripts/test.sh -m slow` or
# `bash scripts/test.sh tests/core` (pyproject's default markers: no slow/gpu/integration).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
  set -- tests integration_tests -m "not slow and not gpu"
fi
exec "$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
