bash scripts/p2_run.sh vlm_billm recipes/baseline_billm_vlm.yaml 
