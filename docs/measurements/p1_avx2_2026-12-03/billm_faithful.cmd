bash scripts/p1_run.sh billm_faithful recipes/baseline_billm_lm.yaml 
