bash scripts/p1_run.sh bivlm_w1_colscale_bf16 recipes/bivlm_lm_w1.yaml --set col_scale=true --fake-quant  # auto calibration dtype: bfloat16 on this machine (ran as out/p1/bivlm_w1_colscale)
