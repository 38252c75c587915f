"""Tiny random VLMs of each supported family, with matching calibration samples.

Each family gives ``model()`` and ``sample(gen)``: a dict of tensors for one sample, shaped
exactly as the model's forward takes them (batch dimension included where the family wants
one), with as many image tokens in the text as the vision tower produces image features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TEXT = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
IMAGE_TOKEN = 150
SEQ = 48


@dataclass(frozen=True)
class Family:
    model: Callable[[], torch.nn.Module]
    sample: Callable[[torch.Generator], dict[str, torch.Tensor]]
    vision_prefix: str
    projector_prefix: str


def _ids(n_image_tokens: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(3, 140, (1, SEQ), generator=gen)
    ids[:, 2 : 2 + n_image_tokens] = IMAGE_TOKEN
    return ids


def _llava_model(text: dict | None = None, vision: dict | None = None):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vc = CLIPVisionConfig(
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
            **(vision or {}),
        }
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=LlamaConfig(**{**TEXT, **(text or {})}),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg)


def _llava_sample(gen):
    # 32x32 image, 8x8 patches -> 16 features (CLS dropped by the "default" strategy).
    return {"input_ids": _ids(16, gen), "pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}


def _qwen2_vl_model(text: dict | None = None, vision: dict | None = None):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text_cfg = {
        **TEXT,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        **(text or {}),
    }
    vision_cfg = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text_cfg["hidden_size"],  # the merger projects into the LM's width
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        **(vision or {}),
    }
    cfg = Qwen2VLConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        image_token_id=IMAGE_TOKEN,
        video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=IMAGE_TOKEN + 2,
        vision_end_token_id=IMAGE_TOKEN + 3,
    )
    return Qwen2VLForConditionalGeneration(cfg)


def _qwen2_vl_sample(gen):
    # Grid t=1, h=4, w=4 -> 16 patches of 3*2*4*4 values; 2x2 merge -> 4 image tokens.
    ids = _ids(4, gen)
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(16, 96, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def _idefics3_model(text: dict | None = None, vision: dict | None = None, smolvlm: bool = False):
    """A tiny Idefics3 (or, with ``smolvlm``, SmolVLM: the same architecture, its own classes).
    The defaults give 4 image tokens a tile (32x32 tiles, 8x8 patches, pixel shuffle by 2)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        **(vision or {}),
    }
    config, model = (
        (SmolVLMConfig, SmolVLMForConditionalGeneration)
        if smolvlm
        else (Idefics3Config, Idefics3ForConditionalGeneration)
    )
    cfg = config(
        vision_config=vision,
        text_config=LlamaConfig(**{**TEXT, **(text or {})}).to_dict(),
        image_token_id=IMAGE_TOKEN,
        scale_factor=2,
        pad_token_id=TEXT["pad_token_id"],  # the default (128002) is outside the tiny vocab
    )
    return model(cfg)


def _idefics3_sample(gen):
    # 16 patches, pixel shuffle by 2 -> 4 image tokens; pixel_values is (batch, images, c, h, w).
    return {"input_ids": _ids(4, gen), "pixel_values": torch.randn(1, 1, 3, 32, 32, generator=gen)}


FAMILIES = {
    "llava": Family(
        _llava_model, _llava_sample, "model.vision_tower.", "model.multi_modal_projector."
    ),
    "qwen2_vl": Family(_qwen2_vl_model, _qwen2_vl_sample, "model.visual.", "model.visual.merger."),
    "idefics3": Family(
        _idefics3_model, _idefics3_sample, "model.vision_model.", "model.connector."
    ),
}


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Batch size 1, tensors as stored (they already carry the family's batch dimension)."""
    if len(batch) != 1:
        raise ValueError(f"tiny VLM calibration expects batch size 1, got {len(batch)}")
    return {k: torch.tensor(v) for k, v in batch[0].items()}


def dataset(family: str, n: int, seed: int = 0):
    """An HF Dataset of n calibration samples for ``family``."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    samples = [FAMILIES[family].sample(gen) for _ in range(n)]
    return Dataset.from_dict({k: [s[k].tolist() for s in samples] for k in samples[0]})


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


VQA_WORDS = (
    "user assistant : ? what is the color of shape does image contain a an there not "
    "in circle green red gray yes teal black rectangle yellow triangle brown blue no"
)


def _vqa_tokenizer(specials: dict[str, int], extra_special_tokens: dict[str, str]):
    """A word-level tokenizer over easy-VQA's words plus ``specials`` at fixed ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in VQA_WORDS.split():
        vocab.setdefault(w, len(vocab))
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        extra_special_tokens=extra_special_tokens,
    )


# Head size 32 in both towers: vLLM's CPU attention needs >= 32.
VLLM_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
VLLM_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)


def save_llava_with_processor(path, text: dict | None = None, vision: dict | None = None) -> None:
    """A tiny LLaVA plus a real LlavaProcessor (CLIP image processor, word-level tokenizer over
    easy-VQA's words, a chat template), saved as a folder ``bivlm quantize`` can read.
    ``text`` / ``vision`` override config fields (e.g. ``VLLM_TEXT`` / ``VLLM_VISION``)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    fast = _vqa_tokenizer({"<image>": IMAGE_TOKEN}, {"image_token": "<image>"})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    torch.manual_seed(0)
    _llava_model(text, vision).save_pretrained(path)
    processor.save_pretrained(path)


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|>"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# Head size 32 in the language model (mrope sections sum to 16) and in the vision tower.
VLLM_QWEN_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
)
VLLM_QWEN_VISION = dict(embed_dim=64, num_heads=2, hidden_size=128)


def save_qwen2_vl_with_processor(path, text: dict | None = None, vision: dict | None = None):
    """A tiny Qwen2-VL plus a real Qwen2VLProcessor (Qwen2-VL image processor: 4-pixel patches,
    2x2 merge, images resized to 32..64 pixels a side; word-level tokenizer over easy-VQA's
    words with Qwen's vision special tokens; a chat template), saved as a folder."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    fast = _vqa_tokenizer(
        {t: IMAGE_TOKEN + i for i, t in enumerate(specials)},
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    image_processor = Qwen2VLImageProcessor(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=32 * 32,
        max_pixels=64 * 64,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    _qwen2_vl_model(text, vision).save_pretrained(path)
    processor.save_pretrained(path)


# Idefics3's special tokens: <row_i_col_j> for a 6x6 grid at 100..135, the others after <image>.
IDEFICS3_SPECIALS = {
    **{f"<row_{i + 1}_col_{j + 1}>": 100 + 6 * i + j for i in range(6) for j in range(6)},
    "<image>": IMAGE_TOKEN,
    "<fake_token_around_image>": IMAGE_TOKEN + 1,
    "<global-img>": IMAGE_TOKEN + 2,
    "<end_of_utterance>": IMAGE_TOKEN + 3,
}


def save_idefics3_with_processor(path, text: dict | None = None, vision: dict | None = None):
    """A tiny Idefics3 plus a real Idefics3Processor (image splitting on: the longest edge is
    resized to two tiles, tiles are the vision tower's image size, plus the global image;
    word-level tokenizer over easy-VQA's words with Idefics3's special tokens; a chat
    template), saved as a folder. ``image_seq_len`` follows the model's config."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    torch.manual_seed(0)
    model = _idefics3_model(text, vision)
    vc = model.config.vision_config
    tile = vc.image_size
    image_seq_len = (tile // vc.patch_size) ** 2 // model.config.scale_factor**2
    fast = _vqa_tokenizer(IDEFICS3_SPECIALS, {"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIALS)})
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=fast,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
