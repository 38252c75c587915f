bash scripts/p2_run.sh lm_gptq_w2_asym recipes/gptq_w2a16_g64_asym_lm.yaml 
