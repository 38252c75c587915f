bash scripts/p1_run.sh bivlm_w1 recipes/bivlm_lm_w1.yaml --set code_choice=block  # the recipe before code_choice: column
