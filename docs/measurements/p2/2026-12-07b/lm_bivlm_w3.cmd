bash scripts/p2_run.sh lm_bivlm_w3 recipes/bivlm_lm_w3.yaml 
