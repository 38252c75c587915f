"""`vllm serve` on 127.0.0.1 for integration tests: start, wait until it answers, stop."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bivlm_plugin.app.serve import post_json  # noqa: F401  (re-exported for the tests)


@contextlib.contextmanager
def vllm_serve(
    folder: Path, log_path: Path, timeout_s: float = 600, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """``bivlm_plugin.app.serve.VllmServer`` on ``folder`` as the tests run it (fp32, eager,
    256 tokens, no --quantization flag). Yields (base URL, served model name)."""
    from bivlm_plugin.app.serve import VllmServer

    server = VllmServer(
        folder,
        log_path,
        timeout_s=timeout_s,
        dtype="float32",
        max_model_len=256,
        extra_args=extra_args,
    )
    with server:
        yield server.url, server.model


def pruned_greedy(model, enc: dict, ratio: float, score: str, merge: bool, max_tokens: int):
    """Transformers' pruned greedy generation of one prompt: (ids, their log-probabilities)."""
    import torch

    from bivlm_plugin.integrations.transformers.pruning import generate_with_pruning

    out = generate_with_pruning(
        model,
        enc,
        ratio,
        score,
        merge=merge,
        max_new_tokens=max_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = out.sequences[0].tolist()
    logprobs = [
        torch.log_softmax(lg[0].float(), -1)[t].item()
        for lg, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def image_chat_body(model: str, png: bytes, question: str, max_tokens: int) -> dict:
    """An OpenAI chat request: one inline PNG and a question; greedy, exactly ``max_tokens``
    tokens (``ignore_eos``), token ids returned."""
    from bivlm_plugin.app.serve import image_chat_body as body

    return body(model, png, question, max_tokens, ignore_eos=True, return_token_ids=True)


def run_vlm_runner(
    folder: Path, request: dict, tmp_path: Path, max_tokens: int
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Greedy generation in vLLM's offline engine (``vllm/vllm_vlm_runner.py``) in a
    subprocess. Returns the process and, when it succeeded, the runner's JSON result."""
    runner = Path(__file__).parent / "vllm" / "vllm_vlm_runner.py"
    req_path, out_path = tmp_path / "req.json", tmp_path / "out.json"
    req_path.write_text(json.dumps(request))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # the runner lists packed layers
    }
    cmd = [sys.executable, str(runner), str(folder), str(req_path), str(out_path), str(max_tokens)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out_path.read_text()) if proc.returncode == 0 else None)
