bash scripts/p2_run.sh vlm_gptq_w2_asym recipes/gptq_w2a16_g64_asym_vlm.yaml 
