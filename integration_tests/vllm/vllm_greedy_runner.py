"""Greedy generation in vLLM's offline engine, run as a script (spawned workers need the
``__main__`` guard, so the end-to-end test runs this file in a subprocess).

Usage: python vllm_greedy_runner.py MODEL_DIR PROMPTS_JSON OUT_JSON MAX_TOKENS [eager|compiled] [TP]
PROMPTS_JSON holds a list of token-id lists; OUT_JSON receives the generated ids per prompt and
the quantization method vLLM resolved. TP > 1 runs that many CPU workers (tensor parallelism;
the caller sets ``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import json
import sys


def main(
    model: str, prompts_path: str, out_path: str, max_tokens: int, mode: str, tp: int = 1
) -> None:
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
        tensor_parallel_size=tp,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    quant = llm.llm_engine.model_config.quantization
    # Runs in the worker (VLLM_ALLOW_INSECURE_SERIALIZATION=1 lets the function travel there;
    # it must be importable: spawned processes have another __main__).
    per_rank = llm.apply_model(packed_layers)  # one result per worker
    packed = per_rank[0]
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "quantization": quant,
        "packed": packed,
        "packed_per_rank": per_rank,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mode = sys.argv[5] if len(sys.argv) > 5 else "eager"
    tp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), mode, tp)
