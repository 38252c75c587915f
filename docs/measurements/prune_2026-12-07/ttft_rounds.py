"""vLLM TTFT of image requests at r = 0.9 vs 0 (feature_norm), 4 interleaved rounds.

Usage: python ttft_rounds.py MODEL_DIR OUT.json
"""

import sys
from pathlib import Path

from bivlm_plugin.app.prune_study import vllm_ttft, write_json

res = vllm_ttft(Path(sys.argv[1]), 0.9, "feature_norm", requests=8, rounds=4)
SCRIPT = "python docs/measurements/prune_2026-12-07/ttft_rounds.py"
res["command"] = " ".join([SCRIPT, *sys.argv[1:]])
write_json(Path(sys.argv[2]), res)
print(res["ttft_ratio"], res["ttft_ratio_per_round"], res["ttft_median_s"])
