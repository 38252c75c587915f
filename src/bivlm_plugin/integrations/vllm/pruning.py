"""Visual-token pruning as a vLLM hook (LLaVA here; Qwen2-VL / Qwen2.5-VL in ``pruning_qwen.py``):
fewer image placeholders, exactly those embeddings.

Off by default. Turned on by a ``bivlm_pruning`` entry in the checkpoint's ``config.json``
(``bivlm quantize --prune-ratio R`` writes it), overridable when serving::

    vllm serve DIR --hf-overrides '{"bivlm_pruning": {"ratio": 0.9, "score": "feature_norm"}}'
    vllm serve DIR --hf-overrides '{"bivlm_pruning": {"ratio": 0.9, "merge": true}}'  # merged
    vllm serve DIR --hf-overrides '{"bivlm_pruning": {"ratio": 0}}'        # off

Both sides of vLLM read the same (overridden) config: the multimodal processor emits
``keep_count(N, ratio)`` placeholders per image instead of N, and the model's
``embed_multimodal`` returns exactly the kept embeddings, chosen by a text-agnostic score
(``pruning/scores.py``) and kept in their original order; with ``merge`` on, each pruned token
is merged into the kept token it is most like (``merge_pruned``) instead of dropped. Text-agnostic
scores and the merge depend on the image only, so they agree with vLLM's prefix and encoder
caches. The plugin registers the class below for the architecture name
``LlavaForConditionalGeneration`` and ``pruning_qwen.py``'s classes for
``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``; with pruning off
each is vLLM's own.

Supported (``SERVING_FAMILY_SCORES``): LLaVA with a CLIP tower, ``vision_feature_layer=-1``, the
``default`` strategy, scores ``feature_norm``, ``cls_attention``, ``mean_attention``; Qwen2-VL
and Qwen2.5-VL with ``feature_norm`` and ``mean_attention`` (kept tokens keep their original
M-RoPE positions; see ``pruning_qwen.py``); tensor parallelism 1 for the attention scores (each
rank would see only its own heads). Anything else fails at load naming what works.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bivlm_plugin.pruning.scores import (
    CONFIG_KEY,
    SCORES,
    SERVING_FAMILIES,
    SERVING_FAMILY_SCORES,
    SERVING_SCORES,
    keep_count,
    keep_indices,
    merge_pruned,
)

__all__ = ["CONFIG_KEY", "PruningSettings", "pruning_settings", "register_pruning_models"]

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = SERVING_FAMILIES


@dataclass(frozen=True)
class PruningSettings:
    ratio: float
    score: str
    merge: bool = False

    @property
    def enabled(self) -> bool:
        return self.ratio > 0


def pruning_settings(hf_config: Any) -> PruningSettings:
    """The validated ``bivlm_pruning`` entry of a model config (ratio 0 when absent)."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        return PruningSettings(0.0, "feature_norm")
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"config {CONFIG_KEY} must be a mapping like {{'ratio': 0.9, 'score': "
            f"'feature_norm', 'merge': true}}, got {raw!r}"
        )
    unknown = set(raw) - {"ratio", "score", "merge"}
    if unknown:
        raise ValueError(
            f"config {CONFIG_KEY} has unknown keys {sorted(unknown)}; use ratio, score, merge"
        )
    merge = raw.get("merge", False)
    if not isinstance(merge, bool):
        raise ValueError(f"{CONFIG_KEY}.merge must be true or false, got {merge!r}")
    ratio = float(raw.get("ratio", 0.0))
    score = str(raw.get("score", "feature_norm"))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"{CONFIG_KEY}.ratio must be in [0, 1), got {ratio}; e.g. 0.9 keeps 10% of the image "
            f'tokens (override with --hf-overrides \'{{"{CONFIG_KEY}": {{"ratio": 0.9}}}}\')'
        )
    if score not in SERVING_SCORES:
        why = (
            " (text-conditioned: it needs the prompt, which vLLM's encoder cache does not see)"
            if score in SCORES
            else ""
        )
        raise ValueError(
            f"{CONFIG_KEY}.score {score!r} is not served{why}; use one of {SERVING_SCORES}"
        )
    model_type = getattr(hf_config, "model_type", None)
    if ratio > 0 and model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"visual-token pruning in vLLM supports {list(SUPPORTED_FAMILIES)}, not model_type "
            f"{model_type!r}; set {CONFIG_KEY}.ratio to 0"
        )
    if ratio > 0 and score not in SERVING_FAMILY_SCORES[model_type]:
        why = " (its vision tower has no CLS token)" if score == "cls_attention" else ""
        raise ValueError(
            f"{CONFIG_KEY}.score {score!r} is not served for {model_type}{why}; use one of "
            f"{SERVING_FAMILY_SCORES[model_type]}"
        )
    return PruningSettings(ratio, score, merge)


def _check_llava(config: Any, settings: PruningSettings, tp_size: int) -> None:
    vision = getattr(config.vision_config, "model_type", None)
    if vision != "clip_vision_model":
        raise ValueError(f"LLaVA pruning supports a CLIP vision tower, not {vision!r}")
    if config.vision_feature_layer != -1 or config.vision_feature_select_strategy != "default":
        raise ValueError(
            "LLaVA pruning needs vision_feature_layer=-1 and the 'default' strategy, got "
            f"{config.vision_feature_layer} / {config.vision_feature_select_strategy!r}"
        )
    if settings.score != "feature_norm" and tp_size > 1:
        raise ValueError(
            f"{CONFIG_KEY}.score {settings.score!r} needs all attention heads on one rank; with "
            f"tensor_parallel_size={tp_size} use score 'feature_norm'"
        )


def register_pruning_models() -> None:
    """Register the pruning LLaVA for ``LlavaForConditionalGeneration`` and the pruning Qwen2-VL
    / Qwen2.5-VL (``pruning_qwen.ARCHITECTURES``) for theirs (idempotent)."""
    from vllm import ModelRegistry

    from . import pruning_qwen

    targets = {"LlavaForConditionalGeneration": (__name__, "PruningLlavaForConditionalGeneration")}
    targets.update({a: (pruning_qwen.__name__, c) for a, c in pruning_qwen.ARCHITECTURES.items()})
    for arch, (module, cls) in targets.items():
        current = ModelRegistry.models.get(arch)
        if getattr(current, "module_name", None) == module:
            continue
        ModelRegistry.register_model(arch, f"{module}:{cls}")


def _make_classes():
    from vllm.model_executor.models import llava
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PruningLlavaProcessingInfo(llava.LlavaProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            settings = pruning_settings(self.get_hf_config())
            return keep_count(n, settings.ratio) if settings.enabled else n

    class PruningLlavaMultiModalProcessor(llava.LlavaMultiModalProcessor):
        pass

    def build_info(ctx):
        info = llava._build_llava_or_pixtral_hf_info(ctx)
        if isinstance(info, llava.LlavaProcessingInfo):
            return PruningLlavaProcessingInfo(ctx)
        return info

    def build_processor(info, dummy_inputs):
        if isinstance(info, PruningLlavaProcessingInfo):
            return PruningLlavaMultiModalProcessor(info, dummy_inputs)
        return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs)

    @MULTIMODAL_REGISTRY.register_processor(
        build_processor, info=build_info, dummy_inputs=llava.LlavaDummyInputsBuilder
    )
    class PruningLlavaForConditionalGeneration(llava.LlavaForConditionalGeneration):
        """vLLM's LLaVA; with ``bivlm_pruning`` on, each image yields its kept tokens only."""

        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.bivlm_pruning = pruning_settings(self.config)
            if self.bivlm_pruning.enabled:
                tp = vllm_config.parallel_config.tensor_parallel_size
                _check_llava(self.config, self.bivlm_pruning, tp)
                logger.info(
                    "bivlm: pruning %.3g of image tokens by %s%s",
                    self.bivlm_pruning.ratio,
                    self.bivlm_pruning.score,
                    " (merged into the kept ones)" if self.bivlm_pruning.merge else "",
                )

        def _image_pixels_to_features(self, vision_tower, pixel_values):
            if not self.bivlm_pruning.enabled or self.bivlm_pruning.score == "feature_norm":
                return super()._image_pixels_to_features(vision_tower, pixel_values)
            captured: dict[str, torch.Tensor] = {}
            last = vision_tower.vision_model.encoder.layers[-1]

            def grab(_module, args):
                captured["x"] = args[0]

            handle = last.register_forward_pre_hook(grab)
            try:
                feats = super()._image_pixels_to_features(vision_tower, pixel_values)
            finally:
                handle.remove()
            self._bivlm_attention = _clip_attention(last, captured["x"])
            return feats

        def _process_image_input(self, image_input):
            embeds = super()._process_image_input(image_input)
            settings = self.bivlm_pruning
            if not settings.enabled or not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
                return embeds
            score = SCORES[settings.score]
            if score.needs == "image_features":
                scores = score.fn(embeds)
            else:
                scores = score.fn(self._bivlm_attention)
                self._bivlm_attention = None
            kept = keep_indices(scores, settings.ratio)  # (B, k), original order
            if settings.merge:
                return merge_pruned(embeds, kept)
            return embeds.gather(1, kept.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))

    return PruningLlavaForConditionalGeneration


def _clip_attention(layer, hidden: torch.Tensor) -> torch.Tensor:
    """(B, H, S, S) float32 softmax attention of a vLLM CLIP encoder layer on its input."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.layer_norm1(hidden))
    q, k, _ = qkv.chunk(3, dim=-1)
    b, s, _ = q.shape
    heads = attn.num_heads_per_partition
    q = q.float().view(b, s, heads, -1).transpose(1, 2)
    k = k.float().view(b, s, heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)


def __getattr__(name: str):
    if name == "PruningLlavaForConditionalGeneration":
        cls = _make_classes()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
