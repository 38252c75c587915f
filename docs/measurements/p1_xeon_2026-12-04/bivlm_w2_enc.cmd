bash scripts/p1_run.sh bivlm_w2_enc recipes/bivlm_lm_w2.yaml --set candidate_search=encoded --calibration-dtype float32
