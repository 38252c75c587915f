bash scripts/p2_run.sh vlm_gptq_w3_asym recipes/gptq_w3a16_g64_asym_vlm.yaml 
