bash scripts/p1_run.sh bivlm_w2_cfa_calib2 recipes/bivlm_lm_w2.yaml --set code_choice=column --set fold_scales=true --set act_order=true --calibration-offset 128 --calibration-dtype float32
