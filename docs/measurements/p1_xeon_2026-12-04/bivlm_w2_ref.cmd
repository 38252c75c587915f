bash scripts/p1_run.sh bivlm_w2_ref recipes/bivlm_lm_w2.yaml --set candidate_search=refined --calibration-dtype float32
