bash scripts/p2_run.sh vlm_arb_rc recipes/baseline_arb_rc_vlm.yaml 
