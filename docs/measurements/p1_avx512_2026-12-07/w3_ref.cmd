bash scripts/p1_run.sh w3_ref recipes/bivlm_lm_w3.yaml --set candidate_search=refined --calibration-dtype float32
