bash scripts/p2_run.sh vlm_bivlm_w3 recipes/bivlm_vlm_w3.yaml 
