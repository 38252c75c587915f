bash scripts/p2_run.sh vlm_rtn_sign recipes/baseline_rtn_sign_vlm.yaml 
