"""Visual-token pruning in transformers ``generate``: the one entry point is
``generate_with_pruning(model, inputs, prune_ratio, prune_score)``.

Image tokens are pruned after the vision tower and projector, before the language model
(DESIGN.md section 1.5): the image features are scored (``pruning/scores.py``), the top
``1 - prune_ratio`` of each image are kept in their original order, their placeholders stay in
the prompt and the others are removed, and the language model runs on the shortened sequence.

Families and scores:

- LLaVA (``llava``): ``cls_attention`` / ``mean_attention`` (the vision tower's last layer),
  ``feature_norm`` (projector output) and ``text_attention`` (FastV-style: the attention the
  prompt's text after the image gives each image token at an early language-model layer; one
  extra prefill pass with eager attention). Positions are 1-D and renumbered: a kept token
  takes the next position.
- Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): ``feature_norm`` (the merger's
  output, one score per merged 2x2 token), ``mean_attention`` (the attention each patch
  receives in the vision tower's last block, averaged over the merged token's patches; for
  Qwen2.5-VL only when that block has full, not windowed, attention) and ``text_attention``.
  ``cls_attention`` fails: these towers have no CLS token. Positions are NOT renumbered: the
  full prompt's 3-D M-RoPE positions come from the model's own ``get_rope_index``, and each
  kept token (image or text) keeps its original (temporal, height, width) position. They are
  passed to ``generate`` as ``position_ids`` (4, B, T'): row 0 the text positions of the
  shortened sequence (what transformers uses for masks), rows 1-3 the original 3-D positions;
  ``generate`` continues each row with last + 1, exactly as it does for the unpruned prompt,
  so new tokens sit at max(original position) + 1, ... . ``model.model.rope_deltas`` is set to
  max(original position) + 1 - (pruned prompt length), so a forward that derives positions
  from the cache length (no ``position_ids``) lands on the same positions.
- Idefics3 (``idefics3``) and SmolVLM (``smolvlm``, the same architecture under its own
  classes): the processor splits each image into tiles (row-by-column crops, then the global
  image), and each tile becomes a block of ``image_seq_len`` image tokens (the connector's pixel
  shuffle merges ``scale_factor**2`` SigLIP patches into each) among text special tokens
  (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``), which all stay. Each
  tile's block is pruned on its own: ``keep_count(image_seq_len, prune_ratio)`` tokens a tile.
  Scores: ``feature_norm`` (the connector's output), ``mean_attention`` (the attention each
  patch receives in the tower's last layer, averaged over heads and the tile's non-padding
  query patches, then over the ``scale_factor**2`` patches the pixel shuffle merges into one
  token) and ``text_attention``. ``cls_attention`` fails: SigLIP has no CLS token. Positions
  are 1-D and renumbered, as for LLaVA: the language model (Llama) takes plain positions, which
  ``generate`` derives from the shortened sequence's attention mask.
- Other families fail with a message naming the supported ones.

Non-goals: pruning inside the language model (FastV's layer-K dropping); video.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import torch

from bivlm_plugin.pruning.scores import (
    SCORES,
    keep_count,
    keep_indices,
    keep_mask,
    mean_attention_scores,
    merge_pruned,
)

__all__ = [
    "FAMILY_SCORES",
    "FASTV_LAYER",
    "SUPPORTED_FAMILIES",
    "generate_with_pruning",
    "prune_inputs",
    "pruned_position_ids",
]

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
IDEFICS3_FAMILIES = ("idefics3", "smolvlm")
SUPPORTED_FAMILIES = ("llava", *QWEN_FAMILIES, *IDEFICS3_FAMILIES)
_NO_CLS = ("feature_norm", "mean_attention", "text_attention")
# The scores each family can compute (model_type -> names in ``SCORES``).
FAMILY_SCORES = {
    "llava": ("cls_attention", "mean_attention", "feature_norm", "text_attention"),
    **dict.fromkeys(QWEN_FAMILIES, _NO_CLS),
    **dict.fromkeys(IDEFICS3_FAMILIES, _NO_CLS),
}
_WHY_NOT = {"cls_attention": "its vision tower has no CLS token"}
FASTV_LAYER = 2  # FastV's K: the attention of decoder layer 2 (0-based; the last if fewer)


def _check(model, prune_ratio: float, prune_score: str) -> str:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"visual-token pruning supports {list(SUPPORTED_FAMILIES)} in transformers, not "
            f"model_type {family!r}; run it with prune_ratio 0 (no pruning)"
        )
    if prune_score not in SCORES:
        raise ValueError(f"unknown prune score {prune_score!r}; choose one of {sorted(SCORES)}")
    if prune_score not in FAMILY_SCORES[family]:
        why = _WHY_NOT.get(prune_score, "not implemented for it")
        raise ValueError(
            f"{family} pruning cannot use prune score {prune_score!r} ({why}); "
            f"use one of {list(FAMILY_SCORES[family])}"
        )
    keep_count(1, prune_ratio)  # the one range check: names the ratio and the range
    return family


def _attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    n_heads: int,
    scale: float,
    key_mask: torch.Tensor | None = None,
):
    """(B, S, H*d) queries and keys -> (B, H, S, S) softmax attention, float32; ``key_mask``
    (B, S) bool, False at keys no query may attend to (padding), or None for no mask."""
    b, s, _ = q.shape
    q = q.float().view(b, s, n_heads, -1).transpose(1, 2)
    k = k.float().view(b, s, n_heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


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


def _lm_attention(lm, embeds, mask, position_ids=None):
    """The language model's attention at decoder layer ``FASTV_LAYER`` (B, H, T, T), eager."""
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"  # attention weights are returned by eager only
    try:
        out = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            output_attentions=True,
        )
    finally:
        lm.config._attn_implementation = previous
    return out.attentions[min(FASTV_LAYER, len(out.attentions) - 1)]


def _language_model(model):
    """The decoder stack without its head: ``language_model`` (LLaVA, Qwen) or ``text_model``
    (Idefics3, SmolVLM)."""
    lm = getattr(model.model, "language_model", None)
    return model.model.text_model if lm is None else lm


def _text_attention(model, ids, mask, feats, position_ids=None) -> torch.Tensor:
    """FastV-style scores: (B, N) attention the text after the image gives each image token at
    decoder layer ``FASTV_LAYER``, from a prefill pass on the unpruned prompt (``feats``: the
    image features in the order of the image tokens, (B, N, D) or (B * N, D))."""
    image = ids == model.config.image_token_id
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter(image.unsqueeze(-1), feats.to(embeds.dtype))
    attn = _lm_attention(_language_model(model), embeds, mask, position_ids)
    where = torch.arange(ids.shape[1], device=ids.device)
    last_image = torch.where(image, where, -1).max(1, keepdim=True).values
    text = (where > last_image) & mask.bool()
    return SCORES["text_attention"].fn(attn, image, text)


def _prune_llava(
    model, inputs, prune_ratio: float, prune_score: str, merge: bool = False
) -> dict[str, Any]:
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
    kept_feats = merge_pruned(feats, kept).flatten(0, 1) if merge else feats[keep_image]
    embeds = embeds.masked_scatter(
        (new_ids == model.config.image_token_id).unsqueeze(-1), kept_feats.to(embeds.dtype)
    )
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask[keep_tok].view(ids.shape[0], -1),
        "kept": kept,
    }


# --- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------


def _qwen_image_features(model, pixels, grid, need_attention: bool):
    """The model's own image path (``get_image_features``): a list of per-image features
    (N_i, D), image token order; and, if asked, the last vision block's attention, one
    (1, H, L, L) float32 matrix per attention segment (one image), in the block's token order
    (Qwen2.5-VL's window-permuted order), recomputed from that block's input."""
    visual = model.model.visual
    block = visual.blocks[-1]
    captured: dict[str, Any] = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        captured["rope"] = kwargs["position_embeddings"]

    handle = block.register_forward_pre_hook(grab, with_kwargs=True) if need_attention else None
    try:
        feats = list(model.model.get_image_features(pixels, grid).pooler_output)
    finally:
        if handle is not None:
            handle.remove()
    if not need_attention:
        return feats, None
    sa = block.attn
    x = block.norm1(captured["hidden"])
    q, k, _ = sa.qkv(x).reshape(x.shape[0], 3, sa.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotary = sys.modules[type(sa).__module__].apply_rotary_pos_emb_vision
    q, k = rotary(q, k, *captured["rope"])
    bounds = captured["cu_seqlens"].tolist()
    attn = []
    for a, b in itertools.pairwise(bounds):
        qa, ka = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()
        attn.append(torch.softmax(qa @ ka.transpose(-1, -2) * sa.scaling, dim=-1)[None])
    return feats, attn


def _qwen_mean_attention(model, grid, attn) -> list[torch.Tensor]:
    """Per-image (N_i,) scores: the attention each patch receives in the last vision block
    (``mean_attention_scores``, no CLS), averaged over the patches merged into one token."""
    visual = model.model.visual
    unit = visual.spatial_merge_size**2
    received = torch.cat([mean_attention_scores(a, drop_cls=False)[0] for a in attn])
    merged = received.view(-1, unit).mean(-1)  # the block's token order, one per merged token
    if model.config.model_type == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        merged = merged[torch.argsort(window_index.to(merged.device))]
    return list(merged.split((grid.prod(-1) // unit).tolist()))


def _qwen_check_mean_attention(model) -> None:
    visual = model.model.visual
    last = len(visual.blocks) - 1
    if model.config.model_type == "qwen2_5_vl" and last not in list(visual.fullatt_block_indexes):
        raise ValueError(
            "qwen2_5_vl mean_attention needs full attention in the vision tower's last block "
            f"(fullatt_block_indexes {list(visual.fullatt_block_indexes)}, last block {last}); "
            "use feature_norm or text_attention"
        )


def _qwen_position_ids(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpruned prompt's 3-D M-RoPE positions (3, B, T) and rope deltas (B, 1), from the
    model's own ``get_rope_index`` (padding, marked by ``attention_mask``, gets 0)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (ids == model.config.image_token_id).long()
    return model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
    )


def pruned_position_ids(
    positions: torch.Tensor, keep_tokens: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a pruned Qwen2-VL prompt for ``generate``.

    Args:
        positions: (3, B, T) the unpruned prompt's M-RoPE positions (``get_rope_index``).
        keep_tokens: (B, T) bool, True at the tokens that stay; the same count in every row.
        attention_mask: (B, T) the unpruned prompt's mask.

    Returns:
        ``position_ids`` (4, B, T'): row 0 the text positions of the pruned sequence
        (cumulative mask - 1, 0 on padding: what transformers builds masks from), rows 1-3 the
        ORIGINAL 3-D positions of the kept tokens; and ``rope_deltas`` (B, 1):
        max(original position) + 1 - (kept non-padding tokens), the offset from the pruned
        cache length to the next position.
    """
    b = keep_tokens.shape[0]
    kept = positions[:, keep_tokens].view(3, b, -1)
    mask = attention_mask[keep_tokens].view(b, -1)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    position_ids = torch.cat([text[None].to(kept.dtype), kept], dim=0)
    valid = mask.bool()[None].expand_as(kept)
    top = torch.where(valid, kept, torch.zeros_like(kept)).amax(dim=(0, 2))
    rope_deltas = (top + 1 - mask.long().sum(-1)).unsqueeze(1)
    return position_ids, rope_deltas


def _qwen_scores(model, inputs, prune_score: str, feats, attn, positions) -> list[torch.Tensor]:
    grid = inputs["image_grid_thw"]
    if prune_score == "feature_norm":
        return [SCORES["feature_norm"].fn(f[None])[0] for f in feats]
    if prune_score == "mean_attention":
        return _qwen_mean_attention(model, grid, attn)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    scores = _text_attention(model, ids, mask, torch.cat(feats), positions)  # (B, N per row)
    unit = model.model.visual.spatial_merge_size**2
    return list(scores.reshape(-1).split((grid.prod(-1) // unit).tolist()))


def _prune_qwen(
    model,
    inputs,
    prune_ratio: float,
    prune_score: str,
    merge: bool = False,
    keep_image: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Qwen2-VL / Qwen2.5-VL; ``keep_image`` (one (N_i,) bool mask per image) replaces the
    score's choice when given (tests)."""
    if inputs.get("pixel_values_videos") is not None:
        raise ValueError("visual-token pruning handles images only, not pixel_values_videos")
    ids, grid = inputs["input_ids"], inputs.get("image_grid_thw")
    if grid is None or inputs.get("pixel_values") is None:
        raise ValueError(
            "Qwen2-VL pruning needs pixel_values and image_grid_thw (one image or more)"
        )
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    image_id = model.config.image_token_id
    image = ids == image_id
    unit = model.model.visual.spatial_merge_size**2
    n_per_image = (grid.prod(-1) // unit).tolist()
    if int(image.sum()) != sum(n_per_image):
        raise ValueError(
            f"the prompts hold {int(image.sum())} image tokens but image_grid_thw "
            f"{grid.tolist()} gives {sum(n_per_image)} (t*h*w/{unit} per image)"
        )
    if bool((ids[:, -1] == image_id).any()):
        raise ValueError(
            "a prompt ends in an image token; Qwen2-VL closes an image with <|vision_end|>"
        )
    need_attention = keep_image is None and prune_score == "mean_attention"
    if need_attention:
        _qwen_check_mean_attention(model)
    feats, attn = _qwen_image_features(model, inputs["pixel_values"], grid, need_attention)
    positions, _ = _qwen_position_ids(model, inputs)
    if keep_image is None:
        scores = _qwen_scores(model, inputs, prune_score, feats, attn, positions)
        keep_image = []
        for s in scores:
            keep = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
            keep_image.append(keep.scatter_(0, keep_indices(s[None], prune_ratio)[0], True))
    flat = torch.cat(list(keep_image)).to(ids.device)
    keep_tokens = ~image
    keep_tokens[image] = flat
    counts = keep_tokens.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "pruning keeps a different number of tokens per prompt "
            f"({counts.tolist()}); batch prompts whose images have the same grid"
        )
    b = ids.shape[0]
    new_ids = ids[keep_tokens].view(b, -1)
    embeds = model.get_input_embeddings()(new_ids)
    kept_feats = []
    for f, k in zip(feats, keep_image, strict=True):
        k = k.to(f.device)
        kept_feats.append(merge_pruned(f[None], torch.nonzero(k).T)[0] if merge else f[k])
    kept_feats = torch.cat(kept_feats)
    embeds = embeds.masked_scatter((new_ids == image_id).unsqueeze(-1), kept_feats.to(embeds.dtype))
    position_ids, rope_deltas = pruned_position_ids(positions, keep_tokens, mask)
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask[keep_tokens].view(b, -1),
        "position_ids": position_ids,
        "rope_deltas": rope_deltas,
        "keep_tokens": keep_tokens,
        "kept": [torch.nonzero(k).flatten() for k in keep_image],
    }


# --- Idefics3 / SmolVLM ---------------------------------------------------------------------


def _idefics3_image_features(model, pixels, pixel_mask, need_attention: bool):
    """The model's own image path (``get_image_features``, padding tiles dropped): the connector
    output (tiles, image_seq_len, D), tiles in image-token order; and, if asked, the tower's
    last-layer attention (tiles, H, P, P) float32, recomputed from that layer's input with the
    padding patches masked as keys, and the tiles' patch masks (tiles, P) bool (True: real)."""
    tower = model.model.vision_model
    captured: dict[str, Any] = {}

    def grab_patches(module, args, kwargs):
        captured["patches"] = kwargs.get("patch_attention_mask")

    def grab_hidden(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handles = []
    if need_attention:
        handles.append(tower.register_forward_pre_hook(grab_patches, with_kwargs=True))
        handles.append(
            tower.encoder.layers[-1].register_forward_pre_hook(grab_hidden, with_kwargs=True)
        )
    try:
        feats = model.model.get_image_features(pixels, pixel_mask, return_dict=True).pooler_output
    finally:
        for handle in handles:
            handle.remove()
    if not need_attention:
        return feats, None, None
    hidden = captured["hidden"]
    patches = captured["patches"]
    if patches is None:  # the tower's own default: every patch is real
        patches = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    patches = patches.reshape(hidden.shape[0], -1).to(hidden.device)
    layer = tower.encoder.layers[-1]
    x = layer.layer_norm1(hidden)
    sa = layer.self_attn
    attn = _attention_probs(sa.q_proj(x), sa.k_proj(x), sa.num_heads, sa.scale, patches)
    return feats, attn, patches


def _idefics3_mean_attention(model, attn, patches) -> torch.Tensor:
    """(tiles, image_seq_len) scores: the attention each patch receives (mean over heads and the
    tile's real query patches; padding patches, masked as keys, receive 0), averaged over the
    patches the connector's pixel shuffle merges into each token."""
    received = torch.stack(
        [
            mean_attention_scores(a[None][:, :, real], drop_cls=False)[0]
            for a, real in zip(attn, patches, strict=True)
        ]
    )  # (tiles, P)
    connector = model.model.connector
    # The connector's own shuffle, on one channel, groups the patches exactly as it groups the
    # features: (tiles, P, 1) -> (tiles, image_seq_len, scale_factor**2).
    merged = connector.pixel_shuffle(received.unsqueeze(-1), connector.scale_factor)
    return merged.mean(-1)


def _idefics3_check_tiles(model, ids, n_tiles: int) -> None:
    """Every prompt's image tokens form whole tiles, as many as the tower produced."""
    per_tile = model.model.image_seq_len
    n_image = (ids == model.config.image_token_id).sum(1)
    if bool((n_image % per_tile != 0).any()) or int(n_image.sum()) != n_tiles * per_tile:
        raise ValueError(
            f"the prompts hold {n_image.tolist()} image tokens but the vision tower made "
            f"{n_tiles} tiles of image_seq_len {per_tile}; pass the processor's input_ids and "
            "pixel_values together (its image_seq_len must match the model's)"
        )


def _idefics3_scores(model, inputs, prune_score: str, feats, attn, patches) -> torch.Tensor:
    if prune_score == "feature_norm":
        return SCORES["feature_norm"].fn(feats)
    if prune_score == "mean_attention":
        return _idefics3_mean_attention(model, attn, patches)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    # what generate uses for an unpadded or left-padded prompt
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    scores = _text_attention(model, ids, mask, feats.flatten(0, 1), positions)  # (B, N per row)
    return scores.reshape(feats.shape[:2])


def _prune_idefics3(
    model,
    inputs,
    prune_ratio: float,
    prune_score: str,
    merge: bool = False,
    keep_image: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Idefics3 / SmolVLM; ``keep_image`` ((tiles, image_seq_len) bool) replaces the score's
    choice when given (tests)."""
    ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
    if pixels is None or pixels.dim() != 5:
        shape = None if pixels is None else tuple(pixels.shape)
        raise ValueError(
            "Idefics3 pruning needs the processor's pixel_values (batch, tiles, channels, "
            f"height, width), got {shape}"
        )
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    image_id = model.config.image_token_id
    image = ids == image_id
    need_attention = keep_image is None and prune_score == "mean_attention"
    feats, attn, patches = _idefics3_image_features(
        model, pixels.contiguous(), inputs.get("pixel_attention_mask"), need_attention
    )  # contiguous: the model views pixel_values as (batch * tiles, ...)
    _idefics3_check_tiles(model, ids, feats.shape[0])
    if keep_image is None:
        scores = _idefics3_scores(model, inputs, prune_score, feats, attn, patches)
        keep_image = keep_mask(scores, prune_ratio)  # each tile's block on its own
    keep_image = keep_image.to(ids.device)
    keep_tokens = ~image
    keep_tokens[image] = keep_image.reshape(-1)
    counts = keep_tokens.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "pruning keeps a different number of tokens per prompt "
            f"({counts.tolist()}); batch prompts with the same number of image tiles"
        )
    b = ids.shape[0]
    new_ids = ids[keep_tokens].view(b, -1)
    embeds = model.get_input_embeddings()(new_ids)
    keep_image = keep_image.to(feats.device)
    if merge:  # every tile keeps the same count (keep_mask), so the indices stack
        index = torch.nonzero(keep_image)[:, 1].view(keep_image.shape[0], -1)
        kept_feats = merge_pruned(feats, index).flatten(0, 1)
    else:
        kept_feats = feats[keep_image]
    embeds = embeds.masked_scatter((new_ids == image_id).unsqueeze(-1), kept_feats.to(embeds.dtype))
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask[keep_tokens].view(b, -1),
        "keep_tokens": keep_tokens,
        "kept": [torch.nonzero(k).flatten() for k in keep_image],
    }


_PRUNERS = {
    "llava": _prune_llava,
    **dict.fromkeys(QWEN_FAMILIES, _prune_qwen),
    **dict.fromkeys(IDEFICS3_FAMILIES, _prune_idefics3),
}


@torch.inference_mode()
def prune_inputs(
    model,
    inputs: dict[str, torch.Tensor],
    prune_ratio: float,
    prune_score: str = "cls_attention",
    merge: bool = False,
) -> dict[str, Any]:
    """The language-model inputs of a pruned prompt batch.

    Args:
        model: a transformers LLaVA (dense or packed), Qwen2-VL, Qwen2.5-VL, Idefics3 or
            SmolVLM.
        inputs: the processor's output. LLaVA: ``input_ids`` (B, T), ``attention_mask``
            (B, T), ``pixel_values`` (B, 3, H, W), one image per prompt. Qwen: ``input_ids``,
            ``attention_mask`` (left padding allowed), ``pixel_values`` (patches, C),
            ``image_grid_thw`` (images, 3), optionally ``mm_token_type_ids``; any number of
            images per prompt, as long as every prompt keeps the same number of tokens.
            Idefics3 / SmolVLM: ``input_ids``, ``attention_mask`` (left padding allowed),
            ``pixel_values`` (B, tiles, 3, H, W) (all-zero padding tiles are skipped, as the
            model skips them), optionally ``pixel_attention_mask`` (B, tiles, H, W); any
            number of images per prompt, as long as every prompt has as many tiles.
        prune_ratio: share of each image's tokens to drop, in [0, 1) (0 keeps them all);
            Idefics3 / SmolVLM: of each tile's tokens.
        prune_score: a name in ``pruning.scores.SCORES`` the family supports
            (``FAMILY_SCORES``).
        merge: merge each pruned token into the kept token it is most like
            (``pruning.scores.merge_pruned``) instead of dropping it; same token count.

    Returns:
        ``inputs_embeds`` (B, T', D) and ``attention_mask`` (B, T'), T' = T - pruned tokens;
        ``kept``: LLaVA (B, k) int64, Qwen a list of per-image (k_i,) int64, Idefics3 /
        SmolVLM a list of per-tile (k,) int64 (tiles in image-token order), the kept
        image-token indices in original order. Qwen adds ``position_ids`` (4, B, T') and
        ``rope_deltas`` (B, 1) (``pruned_position_ids``); Qwen, Idefics3 and SmolVLM add
        ``keep_tokens`` (B, T) bool.
    """
    family = _check(model, prune_ratio, prune_score)
    return _PRUNERS[family](model, inputs, prune_ratio, prune_score, merge)


def _generate_pruned(model, pruned: dict[str, Any], **generate_kwargs) -> torch.Tensor:
    """``generate`` on ``prune_inputs``' output: the new tokens (B, new)."""
    kwargs = {"inputs_embeds": pruned["inputs_embeds"], "attention_mask": pruned["attention_mask"]}
    if "position_ids" in pruned:
        # generate keeps explicit position_ids and extends each row by last + 1 per new token;
        # rope_deltas serves a later forward that derives positions from the cache length.
        kwargs["position_ids"] = pruned["position_ids"]
        model.model.rope_deltas = pruned["rope_deltas"]
    return model.generate(**kwargs, **generate_kwargs)


@torch.inference_mode()
def generate_with_pruning(
    model,
    inputs: dict[str, torch.Tensor],
    prune_ratio: float,
    prune_score: str = "cls_attention",
    merge: bool = False,
    **generate_kwargs,
) -> torch.Tensor:
    """``model.generate`` on ``inputs`` with ``prune_ratio`` of each image's tokens pruned.

    ``prune_ratio == 0`` calls ``generate`` on the inputs unchanged; ``merge`` as in
    ``prune_inputs``.

    Returns:
        (B, new_tokens) int64: the generated ids only (the prompt is not echoed).
    """
    if prune_score not in SCORES:
        raise ValueError(f"unknown prune score {prune_score!r}; choose one of {sorted(SCORES)}")
    if prune_ratio == 0.0:
        out = model.generate(**inputs, **generate_kwargs)
        return out[:, inputs["input_ids"].shape[1] :]
    pruned = prune_inputs(model, inputs, prune_ratio, prune_score, merge)
    return _generate_pruned(model, pruned, **generate_kwargs)
