bash scripts/p2_run.sh lm_bivlm_w2 recipes/bivlm_lm_w2.yaml 
