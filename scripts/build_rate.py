"""Time the first steps of the reference-VLM build's two training phases (its recipe with the
steps cut to a few) and project the full build's training time on this machine.

Usage: python scripts/build_rate.py PRETRAIN_STEPS ALIGN_STEPS [tiny]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from bivlm_plugin.utils import fast_bf16
from bivlm_plugin.zoo import easyvqa_vlm as z
from bivlm_plugin.zoo import registry


def main(n_pre: int, n_align: int, tiny: bool) -> None:
    base = z.TINY if tiny else z.REFERENCE
    r = dataclasses.replace(base, pretrain_steps=n_pre, steps=n_align, warmup=2)
    torch.manual_seed(0)
    lm = registry.build("smollm2-135m")
    proc = z._make_processor(lm, r)
    model = z._make_model(lm, proc, r)
    prefix, images = z._load_train(proc, r)
    train = images[: -r.val_images]
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    t = time.perf_counter()
    z._pretrain_vision(model, train, r)
    t_pre = time.perf_counter() - t
    z._match_embedding_scale(model, train)
    z._add_lora(model, r)
    model.train()
    t = time.perf_counter()
    z._align(model, prefix, train, r)
    t_al = time.perf_counter() - t
    minutes = (t_pre / n_pre * base.pretrain_steps + t_al / n_align * base.steps) / 60
    print(
        json.dumps(
            {
                "recipe": base.name,
                "fast_bf16": fast_bf16(),
                "pretrain_s_per_step": t_pre / n_pre,
                "align_s_per_step": t_al / n_align,
                "projected_training_min": minutes,
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "tiny")
