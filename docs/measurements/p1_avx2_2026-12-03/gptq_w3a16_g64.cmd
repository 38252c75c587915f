bash scripts/p1_run.sh gptq_w3a16_g64 recipes/gptq_w3a16_g64.yaml 
