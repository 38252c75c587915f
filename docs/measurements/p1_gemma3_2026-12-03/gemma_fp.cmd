bivlm eval ppl --model <bivlm zoo build gemma3-270m> --json out/p1/gemma_fp.json
