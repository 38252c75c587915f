bash scripts/p1_run.sh bivlm_w1_fold recipes/bivlm_lm_w1.yaml --set fold_scales=true --calibration-dtype float32  # code ad0b3dd: one scale over the stacked rows, v -> o not folded under GQA
