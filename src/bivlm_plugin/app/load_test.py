"""``bivlm bench load``: concurrent mixed text and image requests against ``vllm serve``.

Every request is greedy with a fixed length (``ignore_eos``) and asks for its token ids, so a
sample of them can be sent again one at a time and compared token for token: batching under
load must not change what a request gets. Bounded in count (``n_requests``) and time (a
timeout per request); loopback only (the server is ``VllmServer``).
"""

from __future__ import annotations

import statistics
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bivlm_plugin.app.serve import chat_body, image_chat_body, post_json

__all__ = ["mixed_requests", "percentile", "run_load_test"]

TEXT_PROMPTS = (
    "Name three primary colours.",
    "What is the capital of France?",
    "Count from one to five.",
    "Describe a circle in one sentence.",
)


def mixed_requests(
    model: str,
    n: int,
    images: list[tuple[bytes, str]],
    max_tokens: int = 8,
    text_prompts: tuple[str, ...] = TEXT_PROMPTS,
) -> list[dict[str, Any]]:
    """``n`` chat bodies alternating image questions (``images``: (PNG, question)) and text-only
    prompts; greedy, exactly ``max_tokens`` tokens, token ids returned."""
    _check_counts(n, 1)
    if not images:
        raise ValueError("mixed_requests needs at least one (image, question)")
    extra = {"ignore_eos": True, "return_token_ids": True}
    bodies = []
    for i in range(n):
        if i % 2 == 0:
            png, question = images[(i // 2) % len(images)]
            bodies.append(image_chat_body(model, png, question, max_tokens, **extra))
        else:
            text = text_prompts[(i // 2) % len(text_prompts)]
            bodies.append(chat_body(model, text, max_tokens, **extra))
    return bodies


def _check_counts(n_requests: int, concurrency: int) -> None:
    if n_requests < 1:
        raise ValueError(f"--requests must be at least 1, got {n_requests}")
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _one(url: str, body: dict, timeout_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = post_json(f"{url}/v1/chat/completions", body, timeout_s=timeout_s)
        ids = res["choices"][0].get("token_ids")
        return {"ok": True, "seconds": time.perf_counter() - t0, "token_ids": ids,
                "text": res["choices"][0]["message"]["content"]}  # fmt: skip
    except (urllib.error.URLError, TimeoutError, OSError, KeyError, ValueError) as e:
        return {
            "ok": False,
            "seconds": time.perf_counter() - t0,
            "error": f"{type(e).__name__}: {e}",
        }


def run_load_test(
    url: str,
    bodies: list[dict[str, Any]],
    concurrency: int = 32,
    sample: int = 4,
    timeout_s: float = 300.0,
    healthy=None,
) -> dict[str, Any]:
    """Send ``bodies`` with ``concurrency`` in flight, then ``sample`` of them (evenly spread,
    image and text alike) one at a time, and compare.

    Args:
        healthy: a callable returning whether the server is healthy (``VllmServer.healthy``);
            checked after the run.

    Returns:
        ``n_requests``, ``answered``, ``errors``, latency ``p50_s`` / ``p99_s`` / ``max_s`` of
        the concurrent requests, ``wall_s``, ``sample_indices``, ``sample_equal`` (token ids
        of the sample equal to the one-by-one answers), ``mismatches``, ``healthy_after``.
    """
    n = len(bodies)
    _check_counts(n, concurrency)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(concurrency, n)) as ex:
        results = list(ex.map(lambda b: _one(url, b, timeout_s), bodies))
    wall = time.perf_counter() - t0
    lat = [r["seconds"] for r in results if r["ok"]]
    errors = [{"index": i, "error": r["error"]} for i, r in enumerate(results) if not r["ok"]]
    k = max(1, min(sample, n))
    idx = sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(k)} if k > 1 else {0})
    mismatches = []
    for i in idx:
        alone = _one(url, bodies[i], timeout_s)
        key = "token_ids" if results[i].get("token_ids") is not None else "text"
        if not (results[i]["ok"] and alone["ok"] and results[i][key] == alone[key]):
            mismatches.append(
                {"index": i, "under_load": results[i].get(key), "alone": alone.get(key)}
            )
    return {
        "n_requests": n,
        "concurrency": min(concurrency, n),
        "answered": len(lat),
        "errors": errors,
        "p50_s": percentile(lat, 50) if lat else None,
        "p99_s": percentile(lat, 99) if lat else None,
        "max_s": max(lat) if lat else None,
        "mean_s": statistics.fmean(lat) if lat else None,
        "wall_s": wall,
        "sample_indices": idx,
        "sample_equal": not mismatches,
        "mismatches": mismatches,
        "healthy_after": None if healthy is None else bool(healthy()),
    }


def load_test_folder(
    folder: str | Path,
    log_path: Path,
    n_requests: int = 32,
    concurrency: int = 32,
    max_tokens: int = 8,
    prune_ratio: float | None = None,
    prune_score: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 512,
) -> dict[str, Any]:
    """Serve ``folder`` with ``VllmServer`` and run ``run_load_test`` on it with easy-VQA test
    images (the first P2 questions)."""
    from bivlm_plugin.app.serve import VllmServer
    from bivlm_plugin.eval.vqa import p2_items

    _check_counts(n_requests, concurrency)  # before a server start costs a minute
    items = p2_items(8)
    images = [(Path(it.image_path).read_bytes(), it.question) for it in items]
    server = VllmServer(
        folder,
        log_path,
        prune_ratio=prune_ratio,
        prune_score=prune_score,
        dtype=dtype,
        max_model_len=max_model_len,
    )
    with server:
        bodies = mixed_requests(server.model, n_requests, images, max_tokens)
        res = run_load_test(server.url, bodies, concurrency, healthy=server.healthy)
    res.update(
        model=str(folder), max_tokens=max_tokens, prune_ratio=prune_ratio, dtype=dtype,
        image_requests=(n_requests + 1) // 2, text_requests=n_requests // 2,
    )  # fmt: skip
    return res
