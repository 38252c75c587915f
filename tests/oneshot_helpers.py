"""llm-compressor ``oneshot`` on seeded random token windows (shared by several test modules).

A plain module, not ``conftest``: two conftest files exist under ``tests/`` and ``from conftest
import`` resolves to whichever pytest imported first.
"""

from __future__ import annotations

import torch


def oneshot_on_random_tokens(
    model, tokenizer, recipe: str, vocab: int, n: int = 4, seqlen: int = 32, seed: int = 1
) -> torch.Tensor:
    """Run llm-compressor's oneshot on ``n`` seeded random token windows; returns the ids."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=ds,
        num_calibration_samples=n,
        max_seq_length=seqlen,
    )
    return ids


def bivlm_modifier():
    """The ``BiVLMModifier`` of the active llm-compressor session (after ``oneshot``)."""
    from llmcompressor.core import active_session

    return next(
        m
        for m in active_session().lifecycle.recipe.modifiers
        if type(m).__name__ == "BiVLMModifier"
    )


def packed_roundtrip(model, ids: torch.Tensor, path, layers: list[dict]) -> tuple[float, float]:
    """Save ``model`` packed to ``path``, load it back in float32 and run both on ``ids``.

    Returns (max |logits(loaded) - logits(model)|, storage bits per weight of the report's
    ``layers`` as read from the saved files).
    """
    from transformers import AutoModelForCausalLM

    from bivlm_plugin.format.checkpoint import storage_bits_from_files

    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(path, save_compressed=True)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(ids).logits
    bits = storage_bits_from_files(path)
    sizes = {lay["name"]: lay["shape"][0] * lay["shape"][1] for lay in layers}
    from_files = sum(bits[n] * s for n, s in sizes.items()) / sum(sizes.values())
    return (got - ref).abs().max().item(), from_files
