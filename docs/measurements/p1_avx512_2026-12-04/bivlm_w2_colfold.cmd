bash scripts/p1_run.sh bivlm_w2_colfold recipes/bivlm_lm_w2.yaml --set code_choice=column --set fold_scales=true --calibration-dtype float32
