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
