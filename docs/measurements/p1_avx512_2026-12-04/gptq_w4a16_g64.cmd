bash scripts/p1_run.sh gptq_w4a16_g64 recipes/gptq_w4a16_g64.yaml --calibration-dtype float32
