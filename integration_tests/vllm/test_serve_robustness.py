"""`vllm serve` of a packed VLM with visual-token pruning on, under odd input and load: images of
unusual size and mode are answered, bytes that are not an image get a 4xx answer, and 32
concurrent mixed text and image requests are all answered, a sample equal to the same requests
sent one by one; the server stays healthy throughout. One server for the whole module (starting
one costs a minute on this machine)."""

from __future__ import annotations

import base64
import json
import urllib.error
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

from test_ask import ODD  # noqa: E402  (the same odd images transformers gets)
from tiny_vlms import VLLM_TEXT, VLLM_VISION, save_llava_with_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PRUNE = 0.5  # 16 image tokens -> 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny LLaVA quantized by `bivlm quantize` (whole-VLM ~1-bit recipe, pruning 0.5 in its
    config), served by `VllmServer` as `bivlm serve` runs it (eager, loopback), in float32: in
    bf16 the batch a request lands in changes rounding, so under load a near-tie can flip
    (measured on the reference VLM, RESULTS section 5)."""
    from bivlm_plugin.app.serve import VllmServer
    from bivlm_plugin.cli import main

    root = tmp_path_factory.mktemp("serve_robust")
    src, out = root / "dense", root / "packed"
    save_llava_with_processor(src, VLLM_TEXT, VLLM_VISION)
    argv = ["quantize", "--model", str(src), "--recipe", str(REPO / "recipes/bivlm_vlm_w1.yaml")]
    argv += ["--output", str(out), "--num-calibration-samples", "4", "--prune-ratio", str(PRUNE)]
    assert main(argv) == 0
    with VllmServer(out, root / "serve.log", max_model_len=256, dtype="float32") as srv:
        yield srv, out


def _chat(srv, content, max_tokens=4) -> dict:
    from bivlm_plugin.app.serve import chat_body, post_json

    body = chat_body(srv.model, content, max_tokens, ignore_eos=True, return_token_ids=True)
    return post_json(f"{srv.url}/v1/chat/completions", body, timeout_s=120)


def _image_content(data: bytes, mime: str = "image/png") -> list[dict]:
    url = f"data:{mime};base64," + base64.b64encode(data).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


@pytest.mark.integration
def test_odd_images_are_answered_and_garbage_gets_4xx(server) -> None:
    srv, folder = server
    image_id = json.loads((folder / "config.json").read_text())["image_token_index"]
    for name, data in ODD.items():
        res = _chat(srv, _image_content(data))
        assert len(res["choices"][0]["token_ids"]) == 4, name
        assert res["prompt_token_ids"].count(image_id) == 8, name  # pruned 16 -> 8
    for name, data in {
        "not an image": b"definitely not an image",
        "truncated png": ODD["grayscale"][:60],
        "empty": b"",
    }.items():
        with pytest.raises(urllib.error.HTTPError) as err:
            _chat(srv, _image_content(data))
        assert 400 <= err.value.code < 500, (name, err.value.code)
        assert srv.healthy(), f"the server is unhealthy after {name!r}"
    # ... and still answers a normal request.
    assert len(_chat(srv, _image_content(ODD["rgba"]))["choices"][0]["token_ids"]) == 4


@pytest.mark.integration
def test_32_concurrent_mixed_requests(server) -> None:
    from bivlm_plugin.app.load_test import mixed_requests, run_load_test
    from bivlm_plugin.eval.vqa import p2_items

    srv, _ = server
    images = [(Path(it.image_path).read_bytes(), it.question) for it in p2_items(4)]
    bodies = mixed_requests(srv.model, 32, images, max_tokens=6)
    assert sum("image_url" in json.dumps(b) for b in bodies) == 16
    res = run_load_test(
        srv.url, bodies, concurrency=32, sample=4, timeout_s=300, healthy=srv.healthy
    )
    assert res["answered"] == 32 and not res["errors"], res["errors"]
    assert res["sample_equal"], res["mismatches"]
    assert len(res["sample_indices"]) == 4 and res["healthy_after"]
    assert 0 < res["p50_s"] <= res["p99_s"] <= res["max_s"] <= res["wall_s"] + 1e-6
