"""Visual-token pruning in transformers generate for Idefics3 and SmolVLM (per-tile blocks of
pixel-shuffled tokens, 1-D positions), on tiny random models, float32, greedy."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from bivlm_plugin.integrations.transformers.pruning import (
    FASTV_LAYER,
    _generate_pruned,
    _idefics3_image_features,
    _prune_idefics3,
    generate_with_pruning,
    prune_inputs,
)
from bivlm_plugin.pruning.scores import keep_count, merge_pruned
from tiny_vlms import IMAGE_TOKEN, TEXT, _idefics3_model, save_idefics3_with_processor

FAKE, GLOBAL, ROW_1_COL_1 = IMAGE_TOKEN + 1, IMAGE_TOKEN + 2, 100
VISION = {"patch_size": 4}  # 32x32 tiles: 8x8 patches, pixel shuffle by 2 -> 16 tokens a tile
S, SIDE, SCALE = 16, 8, 2
# One image split 1x2 plus its global image: three tiles, each "<fake> <tag> 16 x <image>".
TAGS = (ROW_1_COL_1, ROW_1_COL_1 + 1, GLOBAL)
PREFIX, SUFFIX = 3, 6  # text before the first <fake>; text after the closing <fake>
SEQ = PREFIX + len(TAGS) * (2 + S) + 1 + SUFFIX
SCORES_OK = ["feature_norm", "mean_attention", "text_attention"]
NEW = 6


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def model(request):
    torch.manual_seed(0)
    return _idefics3_model(vision=VISION, smolvlm=request.param == "smolvlm").eval()


def _inputs(batch: int = 2, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Prompts ``text, (<fake>, tag, 16 image tokens) x 3, <fake>, text``; with ``pad``, row 0
    has ``pad`` left-padding tokens where row 1 has more text."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, SEQ + pad), generator=gen)  # text: no special ids
    mask = torch.ones_like(ids)
    at = PREFIX + pad
    for tag in TAGS:
        ids[:, at], ids[:, at + 1] = FAKE, tag
        ids[:, at + 2 : at + 2 + S] = IMAGE_TOKEN
        at += 2 + S
    ids[:, at] = FAKE
    if pad:
        ids[0, :pad], mask[0, :pad] = TEXT["pad_token_id"], 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, len(TAGS), 3, 32, 32, generator=gen),
    }


def _greedy(**kwargs) -> dict:
    return dict(
        max_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def _features(model, inputs) -> torch.Tensor:
    """The model's own connector output (tiles, S, D)."""
    with torch.no_grad():
        return model.model.get_image_features(
            inputs["pixel_values"], inputs.get("pixel_attention_mask")
        ).pooler_output


def test_ratio_zero_is_plain_generate(model) -> None:
    inputs = _inputs()
    got = generate_with_pruning(model, inputs, 0.0, "feature_norm", max_new_tokens=NEW)
    want = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[:, SEQ:]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("score", SCORES_OK)
def test_keeping_every_token_is_exactly_unpruned_generate(model, score) -> None:
    """The pruning path with nothing pruned (ratio 0 through prune_inputs, a ratio whose
    keep_count is every token through generate_with_pruning, and an all-True keep mask) gives
    the unpruned greedy tokens and logits; row 0 is left-padded, row 1 is not."""
    inputs = _inputs(pad=3)
    want = model.generate(**inputs, **_greedy())
    want_tokens = want.sequences[:, inputs["input_ids"].shape[1] :]
    assert keep_count(S, 0.02) == S
    everything = torch.ones(2 * len(TAGS), S, dtype=torch.bool)
    runs = [
        _generate_pruned(model, prune_inputs(model, inputs, 0.0, score), **_greedy()),
        generate_with_pruning(model, inputs, 0.02, score, **_greedy()),
        _generate_pruned(
            model, _prune_idefics3(model, inputs, 0.5, score, keep_image=everything), **_greedy()
        ),
    ]
    for got in runs:
        assert got.sequences.tolist() == want_tokens.tolist()
        for g, w in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _hand_pruned(model, inputs, kept: list[torch.Tensor]):
    """The pruned prompt written out by hand: every text and special token stays, tile t's
    block keeps image tokens ``kept[t]``, fed tile t's features at those indices."""
    ids = inputs["input_ids"]
    feats = _features(model, inputs)
    rows, image_rows, t = [], [], 0
    for row in ids.tolist():
        out, j = [], 0
        while j < len(row):
            if row[j] != IMAGE_TOKEN:
                out.append(row[j])
                j += 1
                continue
            out += [IMAGE_TOKEN] * len(kept[t])
            image_rows.append(feats[t, kept[t]])
            t, j = t + 1, j + S
        rows.append(out)
    assert t == feats.shape[0]
    short = torch.tensor(rows)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short)
    embeds[short == IMAGE_TOKEN] = torch.cat(image_rows)
    return short, embeds


@pytest.mark.parametrize("score", SCORES_OK)
def test_pruned_generate_matches_a_manual_forward(model, score) -> None:
    """At ratio 0.5: keep_count(16) tokens a tile, in original order; the embeddings are the
    hand-pruned prompt's; the language model run by hand on them (plain 0, 1, 2, ...
    positions) gives generate's first- and second-step logits."""
    inputs = _inputs()
    ratio = 0.5
    k = keep_count(S, ratio)
    pruned = prune_inputs(model, inputs, ratio, score)
    kept = pruned["kept"]
    assert len(kept) == 2 * len(TAGS)
    for tile in kept:
        assert tile.shape == (k,) and bool((tile.diff() > 0).all())
    short, embeds = _hand_pruned(model, inputs, kept)
    assert short.shape == (2, SEQ - len(TAGS) * (S - k))
    for special in (FAKE, GLOBAL, *TAGS):  # the text special tokens all stay
        assert (short == special).sum().item() == (inputs["input_ids"] == special).sum().item()
    torch.testing.assert_close(pruned["inputs_embeds"], embeds, rtol=0, atol=0)
    assert pruned["attention_mask"].shape == short.shape and bool(pruned["attention_mask"].all())

    out = generate_with_pruning(model, inputs, ratio, score, **_greedy())
    assert out.sequences.shape == (2, NEW)
    with torch.no_grad():
        lm = model.model.text_model
        first = lm(inputs_embeds=embeds, use_cache=True)
        logits = model.lm_head(first.last_hidden_state[:, -1])
        torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
        assert out.sequences[:, 0].tolist() == logits.argmax(-1).tolist()
        second = lm(
            inputs_embeds=model.get_input_embeddings()(out.sequences[:, :1]),
            past_key_values=first.past_key_values,
            use_cache=True,
        )
        logits2 = model.lm_head(second.last_hidden_state[:, -1])
        torch.testing.assert_close(out.logits[1], logits2, atol=1e-5, rtol=1e-5)


def _top(scores: torch.Tensor, k: int) -> list[list[int]]:
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values.tolist()


def test_feature_norm_keeps_each_tiles_largest_features(model) -> None:
    inputs = _inputs(seed=3)
    feats = _features(model, inputs)
    kept = prune_inputs(model, inputs, 0.75, "feature_norm")["kept"]
    assert [t.tolist() for t in kept] == _top(feats.norm(dim=-1), keep_count(S, 0.75))


def _eager_tower_attention(model, inputs, monkeypatch) -> torch.Tensor:
    """The weights the tower's own eager attention computes at its last layer (tiles, H, P, P)."""
    tower = model.model.vision_model
    module = sys.modules[type(tower.encoder.layers[-1].self_attn).__module__]
    seen = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        seen.append(weights)
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        _features(model, inputs)
    finally:
        tower.config._attn_implementation = previous
    assert len(seen) == len(tower.encoder.layers)
    return seen[-1].float()


def _hand_mean_attention(weights: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(tiles, S): attention each patch receives (mean over heads and real query patches),
    then the mean over the 2x2 patches (rows 2R, 2R+1; columns 2C, 2C+1) of token R*4+C."""
    received = torch.stack(
        [w.mean(0)[r].mean(0) for w, r in zip(weights, real, strict=True)]
    )  # (tiles, P), patch p at row p // 8, column p % 8
    grid = received.view(-1, SIDE // SCALE, SCALE, SIDE // SCALE, SCALE)  # (t, R, dr, C, dc)
    return grid.mean(dim=(2, 4)).flatten(1)


@pytest.mark.parametrize("padded", [False, True])
def test_mean_attention_is_the_merged_patches_received_attention(
    model, padded, monkeypatch
) -> None:
    """The recomputed last-layer attention equals the tower's eager weights; the score of each
    merged token is the mean over its 2x2 patches of the attention they receive (real queries
    only; with the right half of one tile padded, its padding patches receive nothing)."""
    inputs = _inputs(seed=5)
    real = torch.ones(2 * len(TAGS), SIDE, SIDE, dtype=torch.bool)
    if padded:
        pixel_mask = torch.ones(2, len(TAGS), 32, 32)
        pixel_mask[0, 1, :, 16:] = 0  # tile 1: patch columns 4..7 are padding
        inputs["pixel_attention_mask"] = pixel_mask
        real[1, :, 4:] = False
    real = real.flatten(1)
    weights = _eager_tower_attention(model, inputs, monkeypatch)
    with torch.no_grad():
        _, attn, patches = _idefics3_image_features(
            model, inputs["pixel_values"], inputs.get("pixel_attention_mask"), need_attention=True
        )
    assert attn.shape == (2 * len(TAGS), 2, SIDE * SIDE, SIDE * SIDE)
    assert patches.tolist() == real.tolist()
    torch.testing.assert_close(attn, weights, atol=1e-5, rtol=1e-4)

    want = _hand_mean_attention(weights, real)
    if padded:
        assert bool((want[1].view(4, 4)[:, 2:] < 1e-6).all())  # tokens of padding patches only
    kept = prune_inputs(model, inputs, 0.5, "mean_attention")["kept"]
    assert [t.tolist() for t in kept] == _top(want, keep_count(S, 0.5))


def test_text_attention_is_the_text_after_the_images_attention(model) -> None:
    """FastV-style: at decoder layer FASTV_LAYER (the last of 2 here) of the unpruned prompt,
    the attention the tokens after the last image token give each image token, averaged over
    heads and those queries; each tile keeps its top tokens."""
    inputs = _inputs(seed=7)
    lm = model.model.text_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        lm.config._attn_implementation = previous
    attn = attentions[min(FASTV_LAYER, len(attentions) - 1)].float().mean(1)  # (B, T, T)
    image = inputs["input_ids"] == IMAGE_TOKEN
    last = int(torch.nonzero(image[0]).max())
    want = attn[:, last + 1 :, :].mean(1)[image].view(-1, S)  # (tiles, S)
    kept = prune_inputs(model, inputs, 0.5, "text_attention")["kept"]
    assert [t.tolist() for t in kept] == _top(want, keep_count(S, 0.5))


def test_unsupported_scores_and_bad_inputs_fail_clearly(model) -> None:
    family = model.config.model_type
    inputs = _inputs()
    with pytest.raises(
        ValueError,
        match=rf"{family} pruning cannot use prune score 'cls_attention' \(its vision tower has "
        r"no CLS token\); use one of \['feature_norm', 'mean_attention', 'text_attention'\]",
    ):
        generate_with_pruning(model, inputs, 0.5, "cls_attention", max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown prune score 'fastv'"):
        prune_inputs(model, inputs, 0.5, "fastv")
    with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
        prune_inputs(model, inputs, 1.0, "feature_norm")
    flat = {**inputs, "pixel_values": inputs["pixel_values"][:, 0]}
    with pytest.raises(ValueError, match=r"pixel_values \(batch, tiles, channels"):
        prune_inputs(model, flat, 0.5, "feature_norm")
    fewer = {**inputs, "pixel_values": inputs["pixel_values"][:, :2]}
    with pytest.raises(ValueError, match=r"image tokens but the vision tower made 4 tiles"):
        prune_inputs(model, fewer, 0.5, "feature_norm")

    # row 0 has one tile fewer (its third block is text, its third tile all-zero padding)
    uneven = {k: v.clone() for k, v in inputs.items()}
    start = PREFIX + 2 * (2 + S)
    uneven["input_ids"][0, start : start + 2 + S] = 5
    uneven["pixel_values"][0, 2] = 0
    with pytest.raises(ValueError, match="same number of image tiles"):
        prune_inputs(model, uneven, 0.5, "feature_norm")


def _rgb(height: int, width: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics3")
    save_idefics3_with_processor(path, vision=VISION)
    return path


def test_processor_batch_with_split_images(saved) -> None:
    """A real Idefics3Processor batch (48x40 images: a 2x2 split plus the global image, five
    tiles of 16 tokens each): keeping every token is the unpruned generate, and a pruned
    generate runs from the processor's output as is."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(saved)
    model = Idefics3ForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).eval()
    images = [_rgb(48, 40, 0), _rgb(48, 40, 1)]
    message = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what is the color ?"}],
        }
    ]
    text = processor.apply_chat_template(message, add_generation_prompt=True)
    batch = dict(processor(text=[text, text], images=images, return_tensors="pt"))
    assert tuple(batch["pixel_values"].shape) == (2, 5, 3, 32, 32)
    n = batch["input_ids"].shape[1]
    assert int((batch["input_ids"] == IMAGE_TOKEN).sum()) == 2 * 5 * S
    want = model.generate(**batch, max_new_tokens=NEW, do_sample=False)[:, n:]
    for score in SCORES_OK:
        got = generate_with_pruning(model, batch, 0.02, score, max_new_tokens=NEW)
        assert got.tolist() == want.tolist(), score
        pruned = prune_inputs(model, batch, 0.5, score)
        assert [len(k) for k in pruned["kept"]] == [keep_count(S, 0.5)] * 10
        assert pruned["inputs_embeds"].shape[1] == n - 5 * (S - keep_count(S, 0.5))
        out = generate_with_pruning(model, batch, 0.5, score, max_new_tokens=NEW)
        assert out.shape == (2, NEW)


@pytest.mark.parametrize("score", SCORES_OK)
def test_ask_answers_with_pruning(saved, score) -> None:
    """``bivlm ask`` on an Idefics3 folder, pruned: odd sizes (1x1, 4000x30: a 1x2 split)
    answer, deterministically (random weights: the content means nothing)."""
    from bivlm_plugin.app.ask import ask
    from bivlm_plugin.eval.vqa import load_vlm

    loaded = load_vlm(saved, dtype=torch.float32)
    for size in ((1, 1), (30, 4000), (48, 40)):
        buf = io.BytesIO()
        _rgb(*size, seed=2).save(buf, format="PNG")
        answers = [
            ask(
                saved,
                buf.getvalue(),
                "what shape ?",
                max_new_tokens=3,
                prune_ratio=0.5,
                prune_score=score,
                model_and_processor=loaded,
            )  # fmt: skip
            for _ in range(2)
        ]
        assert isinstance(answers[0], str) and answers[0] == answers[1], size


def test_merge_puts_each_tiles_merged_features_at_its_kept_placeholders(model) -> None:
    """``merge=True``: each tile's kept tokens hold ``merge_pruned`` of that tile's connector
    output; the special tokens and the text are untouched."""
    inputs = _inputs(seed=7)
    ratio = 0.75
    drop = prune_inputs(model, inputs, ratio, "feature_norm")
    merged = prune_inputs(model, inputs, ratio, "feature_norm", merge=True)
    assert torch.equal(merged["keep_tokens"], drop["keep_tokens"])
    feats = _features(model, inputs)
    kept = torch.stack(drop["kept"])  # (tiles, k), tiles in image-token order
    b = inputs["input_ids"].shape[0]
    new_ids = inputs["input_ids"][drop["keep_tokens"]].view(b, -1)
    image = new_ids == IMAGE_TOKEN
    want = merge_pruned(feats, kept).flatten(0, 1)
    torch.testing.assert_close(merged["inputs_embeds"][image], want)
    assert torch.equal(merged["inputs_embeds"][~image], drop["inputs_embeds"][~image])
    assert not torch.allclose(merged["inputs_embeds"][image], drop["inputs_embeds"][image])
