"""Visual-token pruning in transformers ``generate``: the one entry point is
``generate_with_pruning(model, inputs, prune_ratio, prune_score)``.

Image tokens are pruned after the vision tower and projector, before the language model
(DESIGN.md section 1.5): the image features are scored (``pruning/scores.py``), the top
``1 - prune_ratio`` are kept in their original order, their placeholders stay in the prompt and
the others are removed, and the language model runs on the shortened sequence (positions are
renumbered: LLaVA's positions are 1-D, so a kept token takes the next position).

Scores: ``cls_attention`` / ``mean_attention`` (the vision tower's last layer, text-agnostic),
``feature_norm`` (projector output, text-agnostic) and ``text_attention`` (FastV-style: the
attention the prompt's text after the image gives each image token at an early language-model
layer; costs one extra prefill pass with eager attention).

Families: LLaVA. Qwen2-VL and Idefics3 are not done yet: Qwen2-VL needs each kept token's
original M-RoPE position carried into ``generate``'s cached decoding, Idefics3's pixel shuffle
merges four patches per token and its SigLIP tower has no CLS token; both fail with a message.

Non-goals: pruning inside the language model (FastV's layer-K dropping); video.
"""

from __future__ import annotations

from typing import Any

import torch

from bivlm_plugin.pruning.scores import SCORES, keep_count, keep_indices

__all__ = ["FASTV_LAYER", "SUPPORTED_FAMILIES", "generate_with_pruning", "prune_inputs"]

SUPPORTED_FAMILIES = ("llava",)
FASTV_LAYER = 2  # FastV's K: the attention of decoder layer 2 (0-based; the last if fewer)


def _check(model, prune_ratio: float, prune_score: str) -> None:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"visual-token pruning supports {list(SUPPORTED_FAMILIES)} in transformers, not "
            f"model_type {family!r}; run it with prune_ratio 0 (no pruning)"
        )
    if prune_score not in SCORES:
        raise ValueError(f"unknown prune score {prune_score!r}; choose one of {sorted(SCORES)}")
    keep_count(1, prune_ratio)  # the one range check: names the ratio and the range


def _attention_probs(q: torch.Tensor, k: torch.Tensor, n_heads: int, scale: float):
    """(B, S, H*d) queries and keys -> (B, H, S, S) softmax attention, float32, no mask."""
    b, s, _ = q.shape
    q = q.float().view(b, s, n_heads, -1).transpose(1, 2)
    k = k.float().view(b, s, n_heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def _llava_image_features(model, pixel_values: torch.Tensor, need_attention: bool):
    """LLaVA's projected image features (B, N, D) and, if asked, the tower's last-layer
    attention (B, H, 1 + N, 1 + N), recomputed from that layer's input (any attention kernel)."""
    cfg = model.config
    if cfg.vision_feature_select_strategy != "default" or cfg.vision_feature_layer != -1:
        raise ValueError(
            "LLaVA pruning expects vision_feature_layer=-1 and the 'default' strategy (CLS "
            f"dropped), got {cfg.vision_feature_layer} / {cfg.vision_feature_select_strategy!r}"
        )
    tower = model.model.vision_tower
    out = tower(pixel_values.to(model.dtype), output_hidden_states=True)
    feats = model.model.multi_modal_projector(out.hidden_states[-1][:, 1:])
    attn = None
    if need_attention:
        layer = tower.encoder.layers[-1]
        x = layer.layer_norm1(out.hidden_states[-2])
        sa = layer.self_attn
        attn = _attention_probs(sa.q_proj(x), sa.k_proj(x), sa.num_heads, sa.scale)
    return feats, attn


def _text_attention(model, ids, mask, feats) -> torch.Tensor:
    """FastV-style scores: (B, N) attention the text after the image gives each image token at
    decoder layer ``FASTV_LAYER``, from a prefill pass on the unpruned prompt."""
    image = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(image.unsqueeze(-1), feats.to(embeds.dtype))
    lm = model.model.language_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"  # attention weights are returned by eager only
    try:
        out = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    finally:
        lm.config._attn_implementation = previous
    attn = out.attentions[min(FASTV_LAYER, len(out.attentions) - 1)]
    last_image = torch.where(image, torch.arange(ids.shape[1]), -1).max(1, keepdim=True).values
    text = (torch.arange(ids.shape[1]) > last_image) & mask.bool()
    return SCORES["text_attention"].fn(attn, image, text)


@torch.inference_mode()
def prune_inputs(
    model, inputs: dict[str, torch.Tensor], prune_ratio: float, prune_score: str = "cls_attention"
) -> dict[str, Any]:
    """The language-model inputs of a pruned prompt batch.

    Args:
        model: a transformers LLaVA (dense or packed).
        inputs: the processor's output: ``input_ids`` (B, T), ``attention_mask`` (B, T),
            ``pixel_values`` (B, 3, H, W), one image per prompt.
        prune_ratio: share of each image's tokens to drop, in [0, 1).
        prune_score: a name in ``pruning.scores.SCORES``.

    Returns:
        ``inputs_embeds`` (B, T - N + k, D), ``attention_mask`` (B, T - N + k) and ``kept``
        (B, k) int64, the kept image-token indices in original order.
    """
    _check(model, prune_ratio, prune_score)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    image = ids == model.config.image_token_id
    n_image = image.sum(1)
    if pixels.shape[0] != ids.shape[0] or bool((n_image != n_image[0]).any()):
        raise ValueError(
            "pruning needs one image per prompt with the same number of image tokens; got "
            f"{pixels.shape[0]} images for {ids.shape[0]} prompts, tokens {n_image.tolist()}"
        )
    score = SCORES[prune_score]
    feats, attn = _llava_image_features(model, pixels, score.needs == "vision_attention")
    if score.needs == "vision_attention":
        scores = score.fn(attn)
    elif score.needs == "image_features":
        scores = score.fn(feats)
    else:
        scores = _text_attention(model, ids, mask, feats)
    kept = keep_indices(scores, prune_ratio)  # (B, k)
    keep_image = torch.zeros_like(feats[..., 0], dtype=torch.bool).scatter_(1, kept, True)
    keep_tok = ~image
    keep_tok[image] = keep_image.reshape(-1)
    new_ids = ids[keep_tok].view(ids.shape[0], -1)
    embeds = model.get_input_embeddings()(new_ids)
    kept_feats = feats[keep_image].to(embeds.dtype)
    embeds = embeds.masked_scatter(
        (new_ids == model.config.image_token_id).unsqueeze(-1), kept_feats
    )
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask[keep_tok].view(ids.shape[0], -1),
        "kept": kept,
    }


@torch.inference_mode()
def generate_with_pruning(
    model,
    inputs: dict[str, torch.Tensor],
    prune_ratio: float,
    prune_score: str = "cls_attention",
    **generate_kwargs,
) -> torch.Tensor:
    """``model.generate`` on ``inputs`` with ``prune_ratio`` of each image's tokens pruned.

    ``prune_ratio == 0`` calls ``generate`` on the inputs unchanged.

    Returns:
        (B, new_tokens) int64: the generated ids only (the prompt is not echoed).
    """
    if prune_score not in SCORES:
        raise ValueError(f"unknown prune score {prune_score!r}; choose one of {sorted(SCORES)}")
    if prune_ratio == 0.0:
        out = model.generate(**inputs, **generate_kwargs)
        return out[:, inputs["input_ids"].shape[1] :]
    pruned = prune_inputs(model, inputs, prune_ratio, prune_score)
    return model.generate(
        inputs_embeds=pruned["inputs_embeds"],
        attention_mask=pruned["attention_mask"],
        **generate_kwargs,
    )
