bash scripts/p2_run.sh fp  
