P1_MODEL=gemma3-270m bash scripts/p1_run.sh gemma_billm_faithful recipes/baseline_billm_lm.yaml --calibration-dtype float32
