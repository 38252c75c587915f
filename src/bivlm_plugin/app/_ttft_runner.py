"""One vLLM engine timing image requests (spawned workers need the ``__main__`` guard).

Usage: python _ttft_runner.py MODEL_DIR RATIO SCORE N_REQUESTS OUT_JSON
The engine is built with ``hf_overrides={"bivlm_pruning": {"ratio": RATIO, "score": SCORE}}``;
each of the first N P2 questions is sent alone with ``max_tokens=1`` after one warm-up request.
"""

from __future__ import annotations

import json
import sys
import time


def main(model: str, ratio: float, score: str, n: int, out_path: str) -> None:
    from transformers import AutoProcessor

    from bivlm_plugin.eval.vqa import P2
    from bivlm_plugin.eval.vqa_data import easy_vqa_by_image
    from vllm import LLM, SamplingParams

    processor = AutoProcessor.from_pretrained(model)
    # one question per image: no encoder-cache hits across requests
    items = [qs[0] for qs in list(easy_vqa_by_image(P2.split).values())[: n + 1]]
    llm = LLM(
        model=model,
        dtype="auto",
        max_model_len=512,
        max_num_seqs=1,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        hf_overrides={"bivlm_pruning": {"ratio": ratio, "score": score}},
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1)
    times = []
    for i, item in enumerate(items):
        user = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": item.question}],
        }
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        request = {"prompt": prompt, "multi_modal_data": {"image": item.image()}}
        start = time.perf_counter()
        (out,) = llm.generate([request], params, use_tqdm=False)
        if i:  # the first request warms up
            times.append(time.perf_counter() - start)
    with open(out_path, "w") as f:
        json.dump({"ttft_s": times, "prompt_tokens": len(out.prompt_token_ids)}, f)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
