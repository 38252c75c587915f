bash scripts/p2_run.sh lm_gptq_w3_asym recipes/gptq_w3a16_g64_asym_lm.yaml 
