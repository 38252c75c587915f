"""Visual-token pruning in vLLM for Qwen2-VL and Qwen2.5-VL, kept tokens at their ORIGINAL
M-RoPE positions (what ``integrations/transformers/pruning.py`` does, so greedy tokens match
``generate_with_pruning``). Turned on and validated as for LLaVA (``pruning.py``).

How the positions are right although vLLM fixes them before the encoder runs: vLLM's model
runner (``v1/worker/gpu_model_runner.py``, ``_init_mrope_positions``; the CPU runner inherits it)
calls the model's ``get_mrope_input_positions(input_tokens, mm_features)`` when a request
arrives, and each ``MultiModalFeatureSpec`` there carries the image's processed tensors
(``pixel_values``, ``image_grid_thw``). The classes below override that method: they run the
vision tower on the image (one image at a time), score its tokens, keep the top ones
(``pruning/scores.py``) and lay the prompt out with ``pruning/mrope.py``: each kept placeholder
at its token's original (t, h, w) position, the text after an image where it would be without
pruning, and ``delta`` so generated tokens continue at 1 + the largest prompt position.
``embed_multimodal`` (via ``_process_image_input``) runs the same per-image computation and
returns exactly those kept embeddings; the processor emits ``keep_count(N, ratio)``
placeholders per image. Both hooks recompute the choice from the same tensors with the same
calls, so they agree as long as the tower is deterministic for a fixed input (it is on CPU; on
GPU it holds for fixed shapes, which per-image encoding gives). vLLM's own pruning path for
this (``SupportsMultiModalPruning.recompute_mrope_positions``, used by EVS video pruning) is not
used: the runner enables it only for ``--video-pruning-rate`` and the CPU runner's
``load_model`` never enables it.

When a request's image is already entirely in the prefix cache, vLLM strips its pixels before
the runner sees it (``multimodal/utils.py``, ``strip_covered_mm_data``, keeps only
``image_grid_thw``): those image tokens are never computed again, so their positions are never
read; they get the grid's first k positions and every other token its true one.

Costs: the vision tower runs twice per new request image (positions, then embeddings; an
encoder-cache hit skips the second), and images are encoded one at a time. The scheduler
budgets the encoder by placeholders (k per image), not by the N tokens the tower computes.

Supported: images (videos pass unpruned, at vLLM's own positions); scores ``feature_norm`` (the
merger's output) and ``mean_attention`` (attention each patch receives in the tower's last
block, averaged over the patches of one merged token; Qwen2.5-VL only when that block has full
attention); pixel inputs (``image_embeds`` inputs are refused per request). Refused at load:
``mean_attention`` with tensor parallelism > 1 or a compiled encoder, ``--video-pruning-rate``
(EVS) and encoder CUDA graphs (they bypass ``embed_multimodal``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from bivlm_plugin.pruning.mrope import MediaSpan, pruned_mrope_positions
from bivlm_plugin.pruning.scores import (
    SCORES,
    keep_count,
    keep_indices,
    mean_attention_scores,
    merge_pruned,
)

from .pruning import CONFIG_KEY, PruningSettings, pruning_settings

__all__ = ["ARCHITECTURES"]

logger = logging.getLogger(__name__)

# vLLM architecture name -> the class below that replaces it
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "PruningQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "PruningQwen2_5_VLForConditionalGeneration",
}


def _check_qwen(config: Any, vllm_config: Any, settings: PruningSettings) -> None:
    """Settings the hook cannot honour, refused at load naming what works."""
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
        raise ValueError(
            f"{CONFIG_KEY} cannot be combined with vLLM's video pruning (--video-pruning-rate): "
            "both rewrite M-RoPE positions; set one of them to 0"
        )
    compilation = vllm_config.compilation_config
    if getattr(compilation, "cudagraph_mm_encoder", False):
        raise ValueError(
            f"{CONFIG_KEY} needs the eager encoder path (embed_multimodal); encoder CUDA graphs "
            "bypass it: turn compilation_config.cudagraph_mm_encoder off"
        )
    if settings.score != "mean_attention":
        return
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:
        raise ValueError(
            f"{CONFIG_KEY}.score 'mean_attention' needs all attention heads on one rank; with "
            f"tensor_parallel_size={tp} use score 'feature_norm'"
        )
    if getattr(compilation, "compile_mm_encoder", False):
        raise ValueError(
            f"{CONFIG_KEY}.score 'mean_attention' reads the tower's last block through a hook, "
            "which a compiled encoder skips: turn compile_mm_encoder off or use 'feature_norm'"
        )
    vision = config.vision_config
    full = getattr(vision, "fullatt_block_indexes", None)
    last = vision.depth - 1
    if full is not None and last not in list(full):
        raise ValueError(
            f"{config.model_type} mean_attention needs full attention in the vision tower's last "
            f"block (fullatt_block_indexes {list(full)}, last block {last}); use feature_norm"
        )


def _attention_probs(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(H, L, L) float32 softmax attention of a vLLM Qwen vision attention module on its input
    ``x`` (L, 1, C), one image, rotary embedding applied as the module does; no mask."""
    qkv, _ = attn.qkv(x)
    q, k, _ = qkv.chunk(3, dim=-1)  # [q; k; v] in both towers when tensor parallelism is 1
    heads, d = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    q, k = (t.reshape(1, x.shape[0], heads, d) for t in (q, k))
    q, k = attn.apply_rotary_emb(torch.cat([q, k]), cos, sin).chunk(2)
    q, k = (t[0].transpose(0, 1).float() for t in (q, k))
    return torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)


def _prune_image_update(update, ratio: float, out_mm_kwargs):
    """A Qwen image ``PromptReplacement`` that emits ``keep_count(N, ratio)`` placeholders."""
    original = update.replacement

    def replacement(item_idx: int):
        item = out_mm_kwargs["image"][item_idx]
        if "pixel_values" not in item:
            raise ValueError(
                f"{CONFIG_KEY} prunes images given as pixels; this request passes image "
                "embeddings (serve them with pruning off: --hf-overrides "
                f'\'{{"{CONFIG_KEY}": {{"ratio": 0}}}}\')'
            )
        tokens = original(item_idx) if callable(original) else original
        return tokens[: keep_count(len(tokens), ratio)]

    return replace(update, replacement=replacement)


class _PruningInfo:
    """Processing-info mixin: the image token count is the kept count (budgets, profiling)."""

    def get_num_image_tokens(self, **kwargs) -> int:
        n = super().get_num_image_tokens(**kwargs)
        settings = pruning_settings(self.get_hf_config())
        return keep_count(n, settings.ratio) if settings.enabled else n


class _PruningProcessor:
    """Multimodal-processor mixin: ``keep_count(N, ratio)`` placeholders per image."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = pruning_settings(self.info.get_hf_config())
        if not settings.enabled:
            return updates
        return [
            _prune_image_update(u, settings.ratio, out_mm_kwargs) if u.modality == "image" else u
            for u in updates
        ]


class _PruningQwen:
    """Model mixin: kept image tokens only, each at its original M-RoPE position."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.bivlm_pruning = pruning_settings(self.config)
        if self.bivlm_pruning.enabled:
            _check_qwen(self.config, vllm_config, self.bivlm_pruning)
            logger.info(
                "bivlm: pruning %.3g of image tokens by %s%s (original M-RoPE positions)",
                self.bivlm_pruning.ratio,
                self.bivlm_pruning.score,
                ", merged into the kept ones" if self.bivlm_pruning.merge else "",
            )

    @torch.inference_mode()
    def _bivlm_encode(self, pixels: torch.Tensor, grid: list[int]):
        """One image: its merged tokens (N, D) and their scores (N,) float32."""
        visual = self.visual
        meta = visual.prepare_encoder_metadata([grid])
        if self.bivlm_pruning.score == "feature_norm":
            feats = visual(pixels, [grid], encoder_metadata=meta)
            return feats, SCORES["feature_norm"].fn(feats[None])[0]
        attn = visual.blocks[-1].attn
        captured: dict[str, Any] = {}

        def grab(_module, args, kwargs):
            captured.update(kwargs, x=args[0])

        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            feats = visual(pixels, [grid], encoder_metadata=meta)
        finally:
            handle.remove()
        probs = _attention_probs(
            attn, captured["x"], captured["rotary_pos_emb_cos"], captured["rotary_pos_emb_sin"]
        )
        received = mean_attention_scores(probs[None], drop_cls=False)[0]
        scores = received.view(-1, visual.spatial_merge_size**2).mean(-1)
        if "reverse_indices" in meta:  # Qwen2.5-VL runs its blocks in window order
            scores = scores[meta["reverse_indices"].to(scores.device)]
        return feats, scores

    def _bivlm_kept(self, pixels: torch.Tensor, grid: list[int]):
        """One image: its kept tokens (k, D) (the pruned ones merged in with ``merge``) and their
        indices (k,), ascending."""
        feats, scores = self._bivlm_encode(pixels, grid)
        kept = keep_indices(scores[None], self.bivlm_pruning.ratio)[0]
        if self.bivlm_pruning.merge:
            return merge_pruned(feats[None], kept[None])[0], kept
        return feats[kept.to(feats.device)], kept

    def _bivlm_span(self, feature) -> MediaSpan:
        ((offset, t, h, w, t_factor),) = self.iter_mm_grid_thw([feature])
        if feature.modality != "image":
            return MediaSpan(offset, (t, h, w), None, t_factor)
        k = keep_count(t * h * w, self.bivlm_pruning.ratio)
        if feature.mm_position.length != k:
            raise ValueError(
                f"an image of {t * h * w} tokens has {feature.mm_position.length} placeholders, "
                f"not keep_count = {k}; the processor and the model disagree on {CONFIG_KEY}"
            )
        pixels = feature.data.get("pixel_values")
        if pixels is None:
            # Pixels stripped: the span is in the prefix cache and its positions are never read.
            return MediaSpan(offset, (t, h, w), torch.arange(k), t_factor)
        grid = feature.data["image_grid_thw"].data.tolist()
        _, kept = self._bivlm_kept(pixels.data, grid)
        return MediaSpan(offset, (t, h, w), kept.cpu(), t_factor)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if not self.bivlm_pruning.enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        spans = [self._bivlm_span(f) for f in mm_features]
        return pruned_mrope_positions(len(input_tokens), spans)

    def _process_image_input(self, image_input):
        if not self.bivlm_pruning.enabled:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":
            raise ValueError(f"{CONFIG_KEY} prunes images given as pixels, not image embeddings")
        grid = image_input["image_grid_thw"]
        pixels = image_input["pixel_values"].split(grid.prod(-1).tolist())
        return tuple(self._bivlm_kept(p, g)[0] for p, g in zip(pixels, grid.tolist(), strict=True))


def _make_class(name: str):
    from vllm.model_executor.models import qwen2_5_vl, qwen2_vl
    from vllm.multimodal import MULTIMODAL_REGISTRY

    if name == "PruningQwen2VLForConditionalGeneration":
        base, info, processor = (
            qwen2_vl.Qwen2VLForConditionalGeneration,
            qwen2_vl.Qwen2VLProcessingInfo,
            qwen2_vl.Qwen2VLMultiModalProcessor,
        )
        dummy = qwen2_vl.Qwen2VLDummyInputsBuilder
    else:
        base, info, processor = (
            qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
            qwen2_5_vl.Qwen2_5_VLProcessingInfo,
            qwen2_5_vl.Qwen2_5_VLMultiModalProcessor,
        )
        dummy = qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder
    info_cls = type(f"Pruning{info.__name__}", (_PruningInfo, info), {})
    processor_cls = type(f"Pruning{processor.__name__}", (_PruningProcessor, processor), {})
    model_cls = type(
        name,
        (_PruningQwen, base),
        {
            "__module__": __name__,
            "__doc__": f"vLLM's {base.__name__}; with {CONFIG_KEY} on, kept image tokens only.",
        },
    )
    register = MULTIMODAL_REGISTRY.register_processor(
        processor_cls, info=info_cls, dummy_inputs=dummy
    )
    return register(model_cls)


def __getattr__(name: str):
    if name in ARCHITECTURES.values():
        cls = _make_class(name)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
