bash scripts/p1_run.sh bivlm_w1_foldw_calib2 recipes/bivlm_lm_w1.yaml --calibration-offset 128 --calibration-dtype float32
