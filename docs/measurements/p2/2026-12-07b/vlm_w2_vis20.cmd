bash scripts/p2_run.sh vlm_w2_vis20 recipes/bivlm_vlm_w2.yaml --set p_sal_vision=0.2 --set bit_budget=2.285  # quantized 20:55 (runner), P2/P1 evaluated separately
