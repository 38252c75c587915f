"""Greedy image-question generation in vLLM's offline engine, run as a script (spawned workers
need the ``__main__`` guard).

Usage: python vllm_vlm_runner.py MODEL_DIR REQUEST_JSON OUT_JSON MAX_TOKENS
REQUEST_JSON: {"prompt": str, "image": path to an image file}. OUT_JSON receives the generated
ids with their log-probabilities, the quantization method vLLM resolved and the packed layers it
built.
"""

from __future__ import annotations

import json
import sys


def main(model: str, request_path: str, out_path: str, max_tokens: int) -> None:
    from PIL import Image

    from bivlm_plugin.integrations.vllm.linear_method import packed_layers
    from vllm import LLM, SamplingParams

    req = json.loads(open(request_path).read())
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=2,
        seed=0,
        limit_mm_per_prompt={"image": 1},
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    image = Image.open(req["image"]).convert("RGB")
    (out,) = llm.generate([{"prompt": req["prompt"], "multi_modal_data": {"image": image}}], params)
    (packed,) = llm.apply_model(packed_layers)
    tokens = list(out.outputs[0].token_ids)
    result = {
        "tokens": tokens,
        "logprobs": [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens, strict=True)],
        "quantization": llm.llm_engine.model_config.quantization,
        "packed": packed,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
