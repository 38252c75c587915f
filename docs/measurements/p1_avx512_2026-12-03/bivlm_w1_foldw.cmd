bash scripts/p1_run.sh bivlm_w1_foldw recipes/bivlm_lm_w1.yaml --set fold_scales=true --calibration-dtype float32  # code d0b9054 (= the recipe's fold_scales: true now)
