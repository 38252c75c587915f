bash scripts/p1_run.sh bivlm_w3_cfa recipes/bivlm_lm_w3.yaml --set code_choice=column --set fold_scales=true --set act_order=true --calibration-dtype float32
