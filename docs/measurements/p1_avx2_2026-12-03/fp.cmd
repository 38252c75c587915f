bivlm eval ppl --model <bivlm zoo build smollm2-135m> --json out/p1/fp.json
