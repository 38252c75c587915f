"""The README's Python examples run as written, so they cannot rot.

Each example is read out of README.md (the fenced ``python`` block that contains a marker line)
and executed with only its placeholders filled: ``"OUT"`` becomes a folder of this test, the
names the text leaves to the reader (``model``, ``ds``, ``tok``) are a tiny LLaMA, random token
windows and its tokenizer. The reference-VLM example runs in
``integration_tests/vllm/test_reference_vlm.py::test_python_oneshot_path`` through
:func:`readme_block` too, on the small reference VLM.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor", reason="needs llm-compressor")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_block(marker: str) -> str:
    """The README's one ``python`` code block holding the line ``marker`` (a substring)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} python blocks of README.md contain {marker!r}"
    return found[0]


def run_readme_code(code: str, namespace: dict) -> dict:
    """Execute README code in ``namespace`` from the repository root (the examples name recipes
    relative to it); returns the namespace."""
    old = Path.cwd()
    os.chdir(REPO)
    try:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    finally:
        os.chdir(old)
    return namespace


@pytest.fixture(scope="module")
def packed_llama(tiny_llama_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    import bivlm_plugin  # noqa: F401  (registers BiVLMModifier for the fixture's own oneshot)
    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    recipe = (REPO / "recipes" / "bivlm_lm_w1.yaml").read_text()
    oneshot_on_random_tokens(model, tiny_tokenizer, recipe, 300, n=2, seqlen=16)
    out = tmp_path_factory.mktemp("readme") / "packed"
    model.save_pretrained(out, save_compressed=True)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.mark.integration
def test_loading_example_keeps_weights_packed(packed_llama: Path) -> None:
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    code = readme_block("model = BiVLMForCausalLM.from_pretrained(")
    ns = run_readme_code(code.replace('"OUT"', repr(str(packed_llama))), {})
    packed = [m for m in ns["model"].modules() if isinstance(m, BinaryLinear)]
    assert len(packed) == 14  # every decoder linear of the 2-layer model, lm_head excluded
    assert all("weight" not in dict(m.named_parameters()) for m in packed)
    logits = ns["model"](torch.tensor([[5, 17, 42]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.integration
def test_lm_oneshot_example_quantizes(tiny_llama_dir, tiny_tokenizer) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from bivlm_plugin.format.checkpoint import attached_codes

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    code = readme_block('oneshot(model=model, recipe="recipes/bivlm_lm_w1.yaml"')
    run_readme_code(code, {"model": model, "ds": ds, "tok": tiny_tokenizer})
    quantized = [n for n, m in model.named_modules() if attached_codes(m) is not None]
    assert len(quantized) == 14 and "lm_head" not in quantized


def test_every_python_block_is_exercised() -> None:
    """A new README example needs a test here (or in test_reference_vlm.py) to land."""
    markers = (
        "model = BiVLMForCausalLM.from_pretrained(",
        'oneshot(model=model, recipe="recipes/bivlm_lm_w1.yaml"',
        'src = zoo.build("easyvqa-vlm")',
    )
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    unexercised = [b.splitlines()[0] for b in blocks if not any(m in b for m in markers)]
    assert not unexercised, f"README python blocks without a test: {unexercised}"
