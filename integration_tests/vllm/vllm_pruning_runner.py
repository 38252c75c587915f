"""Greedy generation of image prompts in rounds in vLLM's offline engine, run as a script
(spawned workers need the ``__main__`` guard). Each round is one ``generate`` call after the
previous one finished, so a repeated prompt in a later round hits the prefix cache (blocks of
32 tokens).

Usage: python vllm_pruning_runner.py MODEL_DIR REQUEST_JSON OUT_JSON MAX_TOKENS
REQUEST_JSON: {"rounds": [[{"prompt": str, "images": [image paths]}, ...], ...]}.
OUT_JSON receives, per round and prompt, the generated ids and their log-probabilities, the
prompt ids vLLM built and how many prompt tokens came from the prefix cache.
"""

from __future__ import annotations

import json
import sys


def main(model: str, request_path: str, out_path: str, max_tokens: int) -> None:
    from PIL import Image

    from vllm import LLM, SamplingParams

    rounds = json.loads(open(request_path).read())["rounds"]
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        seed=0,
        block_size=32,
        enable_prefix_caching=True,
        limit_mm_per_prompt={"image": max(len(r["images"]) for rs in rounds for r in rs)},
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    result = []
    for requests in rounds:
        prompts = [
            {
                "prompt": r["prompt"],
                "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in r["images"]]},
            }
            for r in requests
        ]
        outs = llm.generate(prompts, params)
        result.append(
            [
                {
                    "tokens": list(o.outputs[0].token_ids),
                    "logprobs": [
                        step[t].logprob
                        for step, t in zip(
                            o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True
                        )
                    ],
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "num_cached_tokens": o.num_cached_tokens,
                }
                for o in outs
            ]
        )
    with open(out_path, "w") as f:
        json.dump({"rounds": result}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
