#!/usr/bin/env bash
# Every row of RESULTS section 1b, back to back (hours on the 2-core machine):
#   bash scripts/p2_queue.sh [ROW ...]     # default: all rows, in this order
# Each row is `bash scripts/p2_run.sh NAME RECIPE`; a row whose P1 JSON exists is skipped.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
declare -A RECIPE=(
  [fp]=""
  [vlm_bivlm_w2]=recipes/bivlm_vlm_w2.yaml
  [vlm_gptq_w2_asym]=recipes/gptq_w2a16_g64_asym_vlm.yaml
  [vlm_bivlm_w1]=recipes/bivlm_vlm_w1.yaml
  [vlm_billm]=recipes/baseline_billm_vlm.yaml
  [vlm_arb_rc]=recipes/baseline_arb_rc_vlm.yaml
  [vlm_rtn_sign]=recipes/baseline_rtn_sign_vlm.yaml
  [vlm_gptq_w3_asym]=recipes/gptq_w3a16_g64_asym_vlm.yaml
  [lm_bivlm_w2]=recipes/bivlm_lm_w2.yaml
  [lm_gptq_w2_asym]=recipes/gptq_w2a16_g64_asym_lm.yaml
  [lm_bivlm_w1]=recipes/bivlm_lm_w1.yaml
  [lm_billm]=recipes/baseline_billm_lm.yaml
  [lm_arb_rc]=recipes/baseline_arb_rc_lm.yaml
  [lm_rtn_sign]=recipes/baseline_rtn_sign_lm.yaml
  [lm_gptq_w3_asym]=recipes/gptq_w3a16_g64_asym_lm.yaml
)
ORDER=(fp vlm_bivlm_w2 vlm_gptq_w2_asym vlm_rtn_sign vlm_billm vlm_arb_rc vlm_bivlm_w1
       vlm_gptq_w3_asym lm_bivlm_w2 lm_gptq_w2_asym lm_bivlm_w1 lm_billm lm_arb_rc lm_rtn_sign
       lm_gptq_w3_asym)
[[ $# -gt 0 ]] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  [[ -v "RECIPE[$name]" ]] || { echo "unknown row $name; rows: ${!RECIPE[*]}" >&2; exit 2; }
  if [[ -f "$ROOT/out/p2/$name.p1.json" ]]; then echo "[queue] $name done, skipped"; continue; fi
  echo "[queue] $name $(date -u +%FT%TZ)"
  bash "$ROOT/scripts/p2_run.sh" "$name" ${RECIPE[$name]} || echo "[queue] $name FAILED"
done
