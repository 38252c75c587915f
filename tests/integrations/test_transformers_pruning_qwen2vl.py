"""Visual-token pruning in transformers generate for Qwen2-VL / Qwen2.5-VL (M-RoPE positions
kept), on tiny random models, float32, greedy."""

from __future__ import annotations

import sys

import pytest
import torch

from bivlm_plugin.integrations.transformers.pruning import (
    _generate_pruned,
    _prune_qwen,
    _qwen_image_features,
    generate_with_pruning,
    prune_inputs,
    pruned_position_ids,
)
from bivlm_plugin.pruning.scores import keep_count, merge_pruned
from tiny_vlms import IMAGE_TOKEN, TEXT, _qwen2_vl_model

VISION_START, VISION_END = IMAGE_TOKEN + 2, IMAGE_TOKEN + 3
GRID = (1, 8, 8)  # 64 patches of 3*2*4*4 values; 2x2 merge -> a 4x4 grid of 16 image tokens
N_IMAGE, SIDE = 16, 4
PREFIX, SUFFIX = 3, 8  # text before <|vision_start|>; text from <|vision_end|> on
SEQ = PREFIX + 1 + N_IMAGE + SUFFIX
SCORES_OK = ["feature_norm", "mean_attention", "text_attention"]
NEW = 6


def _qwen2_5_vl_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,  # 2x2 merged tokens a window: block 0 is windowed
            "fullatt_block_indexes": [1],
            "out_hidden_size": TEXT["hidden_size"],
            "in_channels": 3,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLForConditionalGeneration(cfg)


BUILDERS = {"qwen2_vl": _qwen2_vl_model, "qwen2_5_vl": _qwen2_5_vl_model}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def qwen(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]().eval()


def _inputs(batch: int = 2, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Prompts ``text, <|vision_start|>, 16 image tokens, <|vision_end|>, text``; with ``pad``,
    row 0 has ``pad`` fewer prefix tokens and as many left-padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 140, (batch, SEQ + pad), generator=gen)
    mask = torch.ones_like(ids)
    start = PREFIX + pad
    ids[:, start] = VISION_START
    ids[:, start + 1 : start + 1 + N_IMAGE] = IMAGE_TOKEN
    ids[:, start + 1 + N_IMAGE] = VISION_END
    if pad:
        ids[0, :pad], mask[0, :pad] = TEXT["pad_token_id"], 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch * GRID[1] * GRID[2], 96, generator=gen),
        "image_grid_thw": torch.tensor([GRID] * batch),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def _greedy(**kwargs) -> dict:
    return dict(
        max_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def test_ratio_zero_is_plain_generate(qwen) -> None:
    inputs = _inputs()
    got = generate_with_pruning(qwen, inputs, 0.0, "feature_norm", max_new_tokens=NEW)
    want = qwen.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, SEQ:]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("pad", [0, 3])
def test_keeping_every_token_is_exactly_unpruned_generate(qwen, pad) -> None:
    """The oracle for positions and rope deltas: the pruning path with nothing pruned (ratio 0
    through prune_inputs, and an all-True keep mask) gives the unpruned greedy tokens and
    logits, left padding included; the same embeddings without the 3-D positions do not."""
    inputs = _inputs(pad=pad)
    want = qwen.generate(**inputs, **_greedy())
    want_tokens = want.sequences[:, inputs["input_ids"].shape[1] :]
    everything = [torch.ones(N_IMAGE, dtype=torch.bool)] * 2
    for pruned in (
        prune_inputs(qwen, inputs, 0.0, "feature_norm"),
        _prune_qwen(qwen, inputs, 0.5, "feature_norm", keep_image=everything),
    ):
        assert bool(pruned["keep_tokens"].all())
        got = _generate_pruned(qwen, pruned, **_greedy())
        assert got.sequences.tolist() == want_tokens.tolist()
        for g, w in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    naive = qwen.generate(
        inputs_embeds=pruned["inputs_embeds"], attention_mask=pruned["attention_mask"], **_greedy()
    )
    assert not torch.allclose(naive.logits[0], want.logits[0], atol=1e-3)


def _hand_positions(kept: torch.Tensor) -> torch.Tensor:
    """(3, T') M-RoPE positions of an unpadded pruned prompt, written out by hand: text counts
    up, image token j of the 4x4 grid sits at (s, s + row, s + col), the text after the image
    starts at s + 4, where s is the image's first position."""
    s = PREFIX + 1
    text_before = torch.arange(s).expand(3, -1)
    row, col = kept // SIDE, kept % SIDE
    image = torch.stack([torch.full_like(kept, s), s + row, s + col])
    text_after = (s + SIDE + torch.arange(SUFFIX)).expand(3, -1)
    return torch.cat([text_before, image, text_after], dim=1)


@pytest.mark.parametrize("pad", [0, 2])
def test_kept_tokens_keep_their_original_positions(qwen, pad) -> None:
    inputs = _inputs(pad=pad)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, full_deltas = qwen.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=mask,
    )
    gen = torch.Generator().manual_seed(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    image = ids == IMAGE_TOKEN
    drop = torch.stack([torch.randperm(N_IMAGE, generator=gen)[:10] for _ in range(2)])
    keep[image] = ~torch.zeros(2, N_IMAGE, dtype=torch.bool).scatter_(1, drop, True).view(-1)
    position_ids, deltas = pruned_position_ids(full, keep, mask)
    short = SEQ + pad - 10
    assert position_ids.shape == (4, 2, short)
    for b in range(2):
        torch.testing.assert_close(position_ids[1:, b], full[:, b, keep[b]], rtol=0, atol=0)
        n_kept = int(mask[b].sum()) - 10  # row 0: the pruned sequence's text positions
        assert position_ids[0, b, short - n_kept :].tolist() == list(range(n_kept))
        assert position_ids[0, b, : short - n_kept].tolist() == [0] * (short - n_kept)
    # the cache length of the pruned prompt plus the delta is the unpruned prompt's next position
    n_valid_full = mask.sum(1, keepdim=True)
    assert (deltas + (n_valid_full - 10)).tolist() == (full_deltas + n_valid_full).tolist()

    # through prune_inputs, against positions written by hand (unpadded row)
    pruned = prune_inputs(qwen, _inputs(), 0.5, "feature_norm")
    for b in range(2):
        want = _hand_positions(pruned["kept"][b])
        assert pruned["position_ids"][1:, b].tolist() == want.tolist()


@pytest.mark.parametrize("score", SCORES_OK)
def test_pruned_generate_matches_a_manual_forward(qwen, score) -> None:
    """Independent oracle at ratio 0.5: the language model run by hand on the kept features
    at their original (hand-written) positions gives generate's first- and second-step
    logits; renumbered 1-D positions do not."""
    inputs = _inputs()
    ratio = 0.5
    k = keep_count(N_IMAGE, ratio)
    pruned = prune_inputs(qwen, inputs, ratio, score)
    kept = torch.stack(pruned["kept"])
    assert kept.shape == (2, k) and bool((kept.diff(dim=1) > 0).all())
    out = generate_with_pruning(qwen, inputs, ratio, score, **_greedy())
    assert out.sequences.shape == (2, NEW)

    with torch.no_grad():
        feats = qwen.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
        ids = inputs["input_ids"]
        start = PREFIX + 1
        short = torch.cat([ids[:, :start], ids[:, start : start + k], ids[:, start + N_IMAGE :]], 1)
        embeds = qwen.get_input_embeddings()(short)
        embeds[:, start : start + k] = torch.stack([feats[b][kept[b]] for b in range(2)])
        positions = torch.stack([_hand_positions(kept[b]) for b in range(2)], dim=1)
        lm = qwen.model.language_model
        first = lm(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        logits = qwen.lm_head(first.last_hidden_state[:, -1])
        torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
        assert out.sequences[:, 0].tolist() == logits.argmax(-1).tolist()

        token = out.sequences[:, :1]
        nxt = positions.amax(dim=(0, 2)).view(1, 2, 1).expand(3, 2, 1) + 1
        second = lm(
            inputs_embeds=qwen.get_input_embeddings()(token),
            position_ids=nxt,
            past_key_values=first.past_key_values,
            use_cache=True,
        )
        logits2 = qwen.lm_head(second.last_hidden_state[:, -1])
        torch.testing.assert_close(out.logits[1], logits2, atol=1e-5, rtol=1e-5)

        renumbered = lm(inputs_embeds=embeds)  # 0, 1, 2, ... as a 1-D model would
        wrong = qwen.lm_head(renumbered.last_hidden_state[:, -1])
        assert not torch.allclose(wrong, logits, atol=1e-3)


def test_feature_norm_keeps_the_largest_features(qwen) -> None:
    inputs = _inputs(seed=3)
    with torch.no_grad():
        feats = qwen.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    kept = prune_inputs(qwen, inputs, 0.75, "feature_norm")["kept"]
    for f, got in zip(feats, kept, strict=True):
        want = f.norm(dim=-1).topk(keep_count(N_IMAGE, 0.75)).indices.sort().values
        assert got.tolist() == want.tolist()


def test_vision_attention_matches_the_towers_eager_attention(qwen, monkeypatch) -> None:
    """The recomputed last-block attention equals the weights the tower's eager attention
    computes (one matrix per image)."""
    inputs = _inputs(seed=5)
    module = sys.modules[type(qwen.model.visual.blocks[-1].attn).__module__]
    seen = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        seen.append(weights)
        return out, weights

    visual = qwen.model.visual
    monkeypatch.setattr(module, "eager_attention_forward", recording)
    previous = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            _, got = _qwen_image_features(
                qwen, inputs["pixel_values"], inputs["image_grid_thw"], need_attention=True
            )
    finally:
        visual.config._attn_implementation = previous
    assert len(got) == 2 and got[0].shape == (1, 2, 64, 64)
    for g, w in zip(got, seen[-2:], strict=True):
        torch.testing.assert_close(g, w.float(), atol=1e-5, rtol=1e-4)


def test_unsupported_scores_fail_clearly(qwen) -> None:
    family = qwen.config.model_type
    inputs = _inputs()
    with pytest.raises(
        ValueError,
        match=rf"{family} pruning cannot use prune score 'cls_attention' \(its vision tower has "
        r"no CLS token\); use one of \['feature_norm', 'mean_attention', 'text_attention'\]",
    ):
        generate_with_pruning(qwen, inputs, 0.5, "cls_attention", max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown prune score 'fastv'"):
        prune_inputs(qwen, inputs, 0.5, "fastv")
    with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
        prune_inputs(qwen, inputs, 1.0, "feature_norm")


def test_qwen2_5_mean_attention_needs_a_full_attention_last_block() -> None:
    torch.manual_seed(0)
    model = _qwen2_5_vl_model().eval()
    model.model.visual.fullatt_block_indexes = [0]
    with pytest.raises(ValueError, match="qwen2_5_vl mean_attention needs full attention"):
        prune_inputs(model, _inputs(), 0.5, "mean_attention")


def test_processor_batch_non_square_image(tmp_path) -> None:
    """A real Qwen2VLProcessor batch (48x40 image: a 6x5 token grid): keeping every token is
    the unpruned generate, and a pruned generate runs from the processor's output as is."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from tiny_vlms import save_qwen2_vl_with_processor

    save_qwen2_vl_with_processor(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(48, 40, 3) * 255).astype("uint8")) for _ in range(2)]
    message = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what is the color ?"}],
        }
    ]
    text = processor.apply_chat_template(message, add_generation_prompt=True)
    batch = dict(processor(text=[text, text], images=images, return_tensors="pt"))
    assert batch["image_grid_thw"].tolist() == [[1, 12, 10]] * 2
    n = batch["input_ids"].shape[1]
    want = model.generate(**batch, max_new_tokens=NEW, do_sample=False)[:, n:]
    pruned = prune_inputs(model, batch, 0.0, "feature_norm")
    got = _generate_pruned(model, pruned, max_new_tokens=NEW, do_sample=False)
    assert got.tolist() == want.tolist()
    pruned = prune_inputs(model, batch, 0.5, "feature_norm")
    assert [len(k) for k in pruned["kept"]] == [keep_count(30, 0.5)] * 2
    assert pruned["inputs_embeds"].shape[1] == n - 30 + keep_count(30, 0.5)
    out = generate_with_pruning(model, batch, 0.5, "feature_norm", max_new_tokens=NEW)
    assert out.shape == (2, NEW)


def test_merge_puts_the_merged_features_at_the_kept_placeholders(qwen) -> None:
    """``merge=True``: the same kept tokens at the same original positions, each placeholder
    holding ``merge_pruned`` of its image's merger output."""
    inputs = _inputs(seed=7)
    ratio = 0.75
    k = keep_count(N_IMAGE, ratio)
    drop = prune_inputs(qwen, inputs, ratio, "feature_norm")
    merged = prune_inputs(qwen, inputs, ratio, "feature_norm", merge=True)
    assert all(torch.equal(a, b) for a, b in zip(merged["kept"], drop["kept"], strict=True))
    assert torch.equal(merged["position_ids"], drop["position_ids"])
    with torch.no_grad():
        feats = qwen.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
    start = PREFIX + 1
    for b in range(2):
        want = merge_pruned(feats[b][None], drop["kept"][b][None])[0]
        torch.testing.assert_close(merged["inputs_embeds"][b, start : start + k], want)
    assert not torch.allclose(merged["inputs_embeds"], drop["inputs_embeds"])
    image = torch.zeros(merged["inputs_embeds"].shape[1], dtype=torch.bool)
    image[start : start + k] = True
    assert torch.equal(merged["inputs_embeds"][:, ~image], drop["inputs_embeds"][:, ~image])
