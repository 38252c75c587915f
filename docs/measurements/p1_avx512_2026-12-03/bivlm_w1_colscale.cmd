bash scripts/p1_run.sh bivlm_w1_colscale recipes/bivlm_lm_w1.yaml --set col_scale=true --fake-quant --calibration-dtype float32
