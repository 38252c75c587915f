"""Where a vLLM decode step spends its time: cProfile of one greedy generation, in-process.

Usage: VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \
    .venv/bin/python scripts/vllm_decode_profile.py MODEL_DIR
(128 prompt tokens, 64 generated, batch 1, bf16, eager; a warm-up generation first.)
"""

import cProfile
import pstats
import sys
import time

if __name__ == "__main__":
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=sys.argv[1],
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=1,
        seed=0,
    )
    p = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    pr = [TokensPrompt(prompt_token_ids=list(range(100, 228)))]
    llm.generate(pr, p, use_tqdm=False)
    prof = cProfile.Profile()
    prof.enable()
    t = time.perf_counter()
    llm.generate(pr, p, use_tqdm=False)
    print("gen s", time.perf_counter() - t)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
