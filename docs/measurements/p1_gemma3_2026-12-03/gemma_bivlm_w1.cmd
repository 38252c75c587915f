P1_MODEL=gemma3-270m bash scripts/p1_run.sh gemma_bivlm_w1 recipes/bivlm_lm_w1.yaml --calibration-dtype float32
