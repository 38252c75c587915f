"""`vllm serve` on 127.0.0.1 for integration tests: start, wait until it answers, stop."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(
    folder: Path, log_path: Path, timeout_s: float = 600, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """Run our `vllm` launcher on ``folder`` (fp32, eager, 256 tokens, no --quantization flag).

    Yields (base URL, served model name); the server is terminated on exit.
    """
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(folder)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    cmd += ["--max-model-len", "256", *extra_args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError("vllm serve exited:\n" + log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    name = json.loads(r.read())["data"][0]["id"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise AssertionError(
                        f"vllm serve did not come up in {timeout_s:.0f} s"
                    ) from None
                time.sleep(2)
        yield url, name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def post_json(url: str, payload: dict, timeout_s: float = 300) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def image_chat_body(model: str, png: bytes, question: str, max_tokens: int) -> dict:
    """An OpenAI chat request: one inline PNG (data URL) and a question; greedy, exactly
    ``max_tokens`` tokens (``ignore_eos``), token ids returned."""
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }


def run_vlm_runner(
    folder: Path, request: dict, tmp_path: Path, max_tokens: int
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Greedy generation in vLLM's offline engine (``tests/vllm/vllm_vlm_runner.py``) in a
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
