"""Greedy generation in vLLM's offline engine, run as a script (spawned workers need the
``__main__`` guard, so the end-to-end test runs this file in a subprocess).

Usage: python vllm_greedy_runner.py MODEL_DIR PROMPTS_JSON OUT_JSON MAX_TOKENS [eager|compiled]
PROMPTS_JSON holds a list of token-id lists; OUT_JSON receives the generated ids per prompt and
the quantization method vLLM resolved.
"""

from __future__ import annotations

import json
import sys


def main(model: str, prompts_path: str, out_path: str, max_tokens: int, mode: str) -> None:
    from vllm.inputs import TokensPrompt

    from bivlm_plugin.integrations.vllm.linear_method import packed_layers
    from vllm import LLM, SamplingParams

    prompts = json.loads(open(prompts_path).read())
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=mode == "eager",  # compiled: vLLM's default (torch.compile'd graphs)
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    quant = llm.llm_engine.model_config.quantization
    # Runs in the worker (VLLM_ALLOW_INSECURE_SERIALIZATION=1 lets the function travel there;
    # it must be importable: spawned processes have another __main__).
    (packed,) = llm.apply_model(packed_layers)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "quantization": quant,
        "packed": packed,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), (sys.argv[5:] or ["eager"])[0])
