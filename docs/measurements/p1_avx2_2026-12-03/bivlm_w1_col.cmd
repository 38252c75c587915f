bash scripts/p1_run.sh bivlm_w1_col recipes/bivlm_lm_w1.yaml --set code_choice=column
