bash scripts/p2_run.sh vlm_bivlm_w1 recipes/bivlm_vlm_w1.yaml 
