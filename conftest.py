"""Fixtures shared by tests/ (unit) and integration_tests/ (end to end): tiny models and
tokenizers built in-process (no network, no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent

try:  # property-based tests (tests/test_properties.py): reproducible in CI, wider on request
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("explore", max_examples=1000, deadline=None)
    settings.load_profile(os.environ.get("BIVLM_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # tests/test_properties.py skips itself
    pass
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT} (the repo expects ../shared beside it)")
    return WIKITEXT


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, wikitext_dir):
    """A word-level tokenizer trained in-process on a slice of WikiText-2 valid."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"])
    lines = (wikitext_dir / "valid.txt").read_text(encoding="utf-8").splitlines()[:2000]
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return fast


def tiny_llama_config(vocab_size: int = 500, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def _save_random_llama(tmp_path_factory, tokenizer, name: str, **config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_llama_config(len(tokenizer) + 16, **config)
    )  # WordLevel ids can reach len()
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny random LLaMA with the tiny tokenizer."""
    return _save_random_llama(tmp_path_factory, tiny_tokenizer, "tiny_llama")


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """One random decoder layer of width 512 (linear inputs 512 and 1056): wide enough that
    per-row scales fit the shipped recipes' budgets, as in real models (the 64-wide tiny LLaMA
    needs 2.1 bits at one ring)."""
    return _save_random_llama(tmp_path_factory, tiny_tokenizer, "small_llama", hidden=512, layers=1)
