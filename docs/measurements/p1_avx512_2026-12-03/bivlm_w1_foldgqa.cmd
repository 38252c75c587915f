bash scripts/p1_run.sh bivlm_w1_foldgqa recipes/bivlm_lm_w1.yaml --set fold_scales=true --calibration-dtype float32  # code e7cffd9: v -> o tied per value head, one scale over the stacked rows
