"""``bivlm serve`` and the main job's server: ``vllm serve`` with the plugin, on loopback.

``VllmServer`` starts our ``vllm`` launcher (the plugin loads through vLLM's entry point, so a
``bivlm-binary`` checkpoint needs no ``--quantization`` flag) with settings that start on a
small CPU machine: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; vLLM's CPU backend otherwise
reserves 92% of the memory it sees on NUMA node 0 and fails when less is free) and a short
``--max-model-len``. It waits until ``/v1/models`` answers, and stops the server on exit, on an
exception and on Ctrl-C (the process group is terminated, then killed).

Visual-token pruning is what the checkpoint's ``bivlm_pruning`` entry asks for; ``prune_ratio``
/ ``prune_score`` override it (``--hf-overrides``; ratio 0 turns it off).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "VllmServer",
    "chat_body",
    "chat_image",
    "free_port",
    "image_chat_body",
    "post_json",
    "server_command",
]

DEFAULT_KV_CACHE_GIB = 1
DEFAULT_MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: str | Path,
    port: int,
    host: str = "127.0.0.1",
    dtype: str = "auto",
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    eager: bool = True,
    prune_ratio: float | None = None,
    prune_score: str | None = None,
    prune_merge: bool = False,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The ``vllm serve`` command line (our launcher in this interpreter's ``bin``).

    ``dtype`` "auto" is bfloat16 where the CPU runs it natively, else float32
    (``utils.compute_dtype``), not vLLM's own "auto" (the checkpoint's bf16).
    """
    from bivlm_plugin.pruning.scores import (
        CONFIG_KEY,
        SERVING_SCORES,
        check_prune_merge,
        keep_count,
    )
    from bivlm_plugin.utils import compute_dtype

    dtype = compute_dtype(dtype)

    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(model)]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype]
    cmd += ["--max-model-len", str(max_model_len)]
    if eager:
        cmd.append("--enforce-eager")
    check_prune_merge(prune_ratio, prune_merge)
    if prune_ratio is not None:
        keep_count(1, prune_ratio)  # names the range on a bad ratio
        score = prune_score or "feature_norm"
        if score not in SERVING_SCORES:
            raise ValueError(
                f"--prune-score {score!r} cannot be served; use one of {list(SERVING_SCORES)}"
            )
        entry = {"ratio": float(prune_ratio), "score": score, "merge": bool(prune_merge)}
        overrides = {CONFIG_KEY: entry}
        cmd += ["--hf-overrides", json.dumps(overrides)]
    return cmd + list(extra_args)


class VllmServer:
    """Context manager: a ``vllm serve`` process on loopback; ``url`` and ``model`` inside."""

    def __init__(
        self,
        model: str | Path,
        log_path: str | Path,
        timeout_s: float = 900,
        kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
        port: int | None = None,
        **command_kwargs: Any,
    ) -> None:
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {model} is not a model folder (no config.json)")
        self.port = port or free_port()
        self.cmd = server_command(model, self.port, **command_kwargs)
        self.log_path = Path(log_path)
        self.timeout_s = timeout_s
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = ""
        self.startup_s = 0.0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with self.log_path.open("w") as log:
            self._proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        try:
            self.model = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> str:
        deadline = time.time() + self.timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"vllm serve exited ({self._proc.returncode}):\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    return json.loads(r.read())["data"][0]["id"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.time() > deadline:
                    raise RuntimeError(
                        f"vllm serve did not answer in {self.timeout_s:.0f} s; see {self.log_path}"
                    ) from None
                time.sleep(2)

    def running(self) -> bool:
        """Whether the server process is still alive (inside the ``with`` block)."""
        return self._proc is not None and self._proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def post_json(url: str, payload: dict, timeout_s: float = 300) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def chat_body(model: str, content: Any, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat request body with one user message (a string or content parts), greedy."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


def image_chat_body(
    model: str, png: bytes, question: str, max_tokens: int = 8, **extra: Any
) -> dict[str, Any]:
    """An OpenAI chat request body: one inline PNG (data URL) and a question, greedy."""
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": question},
    ]
    return chat_body(model, content, max_tokens, **extra)


def chat_image(
    url: str, model: str, png: bytes, question: str, max_tokens: int = 8, **extra: Any
) -> dict:
    """One image chat request to a server at ``url``; its JSON answer."""
    body = image_chat_body(model, png, question, max_tokens, **extra)
    return post_json(f"{url}/v1/chat/completions", body)
