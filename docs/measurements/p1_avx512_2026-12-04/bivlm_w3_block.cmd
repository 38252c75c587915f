bash scripts/p1_run.sh bivlm_w3_block recipes/bivlm_lm_w3.yaml --set code_choice=block --set fold_scales=false --set act_order=false --calibration-dtype float32
