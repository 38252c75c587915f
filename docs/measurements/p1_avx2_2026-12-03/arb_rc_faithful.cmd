bash scripts/p1_run.sh arb_rc_faithful recipes/baseline_arb_rc_lm.yaml 
