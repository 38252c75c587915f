"""Visual-token pruning in transformers generate (LLaVA), on a tiny random LLaVA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bivlm_plugin.integrations.transformers.pruning import generate_with_pruning, prune_inputs
from bivlm_plugin.pruning.scores import keep_count, merge_pruned
from tiny_vlms import IMAGE_TOKEN, SEQ, _llava_model


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return _llava_model().eval()


def _inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 140, (batch, SEQ), generator=gen)
    ids[:, 2:18] = IMAGE_TOKEN  # 32x32 image, 8x8 patches: 16 image tokens
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=gen),
    }


@pytest.mark.parametrize(
    "score", ["cls_attention", "mean_attention", "feature_norm", "text_attention"]
)
def test_pruned_generate_equals_model_on_the_short_prompt(llava, score, monkeypatch) -> None:
    """Pruning = the model's own path on a prompt holding only the kept placeholders, fed the
    kept features: same greedy tokens, same logits."""
    inputs = _inputs()
    ratio = 0.75
    pruned = prune_inputs(llava, inputs, ratio, score)
    k = keep_count(16, ratio)
    kept = pruned["kept"]
    assert kept.shape == (2, k) and bool((kept.diff(dim=1) > 0).all())  # original order
    assert pruned["inputs_embeds"].shape[1] == SEQ - 16 + k

    with torch.no_grad():
        feats = llava.model.multi_modal_projector(
            llava.model.vision_tower(
                inputs["pixel_values"], output_hidden_states=True
            ).hidden_states[-1][:, 1:]
        )
    kept_feats = torch.stack([feats[b, kept[b]] for b in range(2)])
    ids = inputs["input_ids"]
    short = torch.cat([ids[:, :2], ids[:, 2 : 2 + k], ids[:, 18:]], dim=1)
    original = llava.model.get_image_features

    def fake_features(pixel_values, **kwargs):
        out = original(pixel_values=pixel_values, **kwargs)
        out.pooler_output = list(kept_feats)
        return out

    got = generate_with_pruning(llava, inputs, ratio, score, max_new_tokens=5, do_sample=False)
    monkeypatch.setattr(llava.model, "get_image_features", fake_features)
    want = llava.generate(
        input_ids=short,
        attention_mask=torch.ones_like(short),
        pixel_values=inputs["pixel_values"],
        max_new_tokens=5,
        do_sample=False,
    )[:, short.shape[1] :]
    assert got.tolist() == want.tolist()


def test_feature_norm_keeps_the_largest_features(llava) -> None:
    inputs = _inputs(batch=1, seed=3)
    with torch.no_grad():
        feats = llava.model.multi_modal_projector(
            llava.model.vision_tower(
                inputs["pixel_values"], output_hidden_states=True
            ).hidden_states[-1][:, 1:]
        )
    want = feats.norm(dim=-1)[0].topk(keep_count(16, 0.5)).indices.sort().values
    assert prune_inputs(llava, inputs, 0.5, "feature_norm")["kept"][0].tolist() == want.tolist()


def test_cls_attention_matches_the_towers_own_attention(llava) -> None:
    """The recomputed last-layer attention equals what CLIP's eager attention returns."""
    from bivlm_plugin.integrations.transformers.pruning import _llava_image_features

    inputs = _inputs(batch=1, seed=5)
    tower = llava.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            want = tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    finally:
        tower.config._attn_implementation = previous
    _, got = _llava_image_features(llava, inputs["pixel_values"], need_attention=True)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


def test_ratio_zero_is_plain_generate(llava) -> None:
    inputs = _inputs()
    got = generate_with_pruning(llava, inputs, 0.0, max_new_tokens=4, do_sample=False)
    want = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, SEQ:]
    assert got.tolist() == want.tolist()


def test_bad_ratio_score_and_family_fail_clearly(llava) -> None:
    inputs = _inputs()
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
            prune_inputs(llava, inputs, bad)
    with pytest.raises(ValueError, match="unknown prune score 'fastv'"):
        generate_with_pruning(llava, inputs, 0.5, "fastv")
    other = SimpleNamespace(config=SimpleNamespace(model_type="gemma3"))
    with pytest.raises(
        ValueError,
        match=r"supports \['llava', 'qwen2_vl', 'qwen2_5_vl', 'idefics3', 'smolvlm'\] in "
        r"transformers, not model_type 'gemma3'",
    ):
        prune_inputs(other, inputs, 0.5)


@pytest.mark.parametrize("score", ["feature_norm", "cls_attention"])
def test_merge_puts_the_merged_features_at_the_kept_placeholders(llava, score) -> None:
    """``merge=True``: the same kept tokens, each placeholder holding ``merge_pruned`` of the
    projector's features; the text embeddings are untouched."""
    inputs = _inputs(seed=7)
    ratio = 0.75
    k = keep_count(16, ratio)
    drop = prune_inputs(llava, inputs, ratio, score)
    merged = prune_inputs(llava, inputs, ratio, score, merge=True)
    assert torch.equal(merged["kept"], drop["kept"])
    assert torch.equal(merged["attention_mask"], drop["attention_mask"])
    with torch.no_grad():
        feats = llava.model.multi_modal_projector(
            llava.model.vision_tower(
                inputs["pixel_values"], output_hidden_states=True
            ).hidden_states[-1][:, 1:]
        )
    got, dropped = merged["inputs_embeds"], drop["inputs_embeds"]
    torch.testing.assert_close(got[:, 2 : 2 + k], merge_pruned(feats, drop["kept"]))
    assert not torch.allclose(got[:, 2 : 2 + k], dropped[:, 2 : 2 + k])
    assert torch.equal(got[:, :2], dropped[:, :2]) and torch.equal(
        got[:, 2 + k :], dropped[:, 2 + k :]
    )
    out = generate_with_pruning(llava, inputs, ratio, score, merge=True, max_new_tokens=3)
    assert out.shape == (2, 3)
