bash scripts/p1_run.sh gptq_w2a16_g64_asym recipes/gptq_w2a16_g64_asym_lm.yaml --fake-quant --calibration-dtype float32
