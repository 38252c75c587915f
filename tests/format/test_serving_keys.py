"""Published key layout: LLaVA's CLIP tower gets its ``vision_model`` prefix back."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bivlm_plugin.format.serving_keys import rewrite_checkpoint_keys

LLAVA = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}}


def _folder(tmp_path, config, keys, shards=1):
    (tmp_path / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for s in range(shards):
        name = f"model-{s}.safetensors" if shards > 1 else "model.safetensors"
        part = keys[s::shards]
        save_file(
            {k: torch.full((2,), float(i)) for i, k in enumerate(part)},
            tmp_path / name,
            metadata={"format": "pt"},
        )
        weight_map.update({k: name for k in part})
    if shards > 1:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return tmp_path


def _keys(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_llava_vision_keys_get_the_published_prefix(tmp_path) -> None:
    keys = [
        "vision_tower.embeddings.patch_embedding.weight",
        "vision_tower.encoder.layers.0.self_attn.q_proj.signs",
        "vision_tower.vision_model.post_layernorm.weight",  # already published: unchanged
        "language_model.model.layers.0.mlp.up_proj.signs",
        "multi_modal_projector.linear_1.weight",
    ]
    folder = _folder(tmp_path, LLAVA, keys, shards=2)
    before = _keys(folder)
    assert rewrite_checkpoint_keys(folder) == 2
    after = _keys(folder)
    assert set(after) == {
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.signs",
        "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.layers.0.mlp.up_proj.signs",
        "multi_modal_projector.linear_1.weight",
    }
    assert torch.equal(
        after["vision_tower.vision_model.embeddings.patch_embedding.weight"],
        before["vision_tower.embeddings.patch_embedding.weight"],
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(after)


def test_other_families_are_left_alone(tmp_path) -> None:
    keys = ["model.visual.blocks.0.attn.qkv.signs", "model.language_model.layers.0.x"]
    folder = _folder(tmp_path, {"model_type": "qwen2_vl", "vision_config": {}}, keys)
    assert rewrite_checkpoint_keys(folder) == 0
    assert set(_keys(folder)) == set(keys)
