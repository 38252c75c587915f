bash scripts/p2_run.sh vlm_bivlm_w2 recipes/bivlm_vlm_w2.yaml 
