"""Protocol P2: easy-VQA test accuracy through transformers ``generate`` (DESIGN.md section 5).

The first 2,000 test questions in file order; each prompt is the model's chat template with the
image and the question; the answer is greedy (``do_sample=False``) and scored by exact match
after lowercasing and stripping punctuation. Works for dense and packed (``bivlm-binary``)
checkpoints alike: ``from_pretrained`` keeps packed weights packed.

Prompts are batched only with prompts of the same token length, so no prompt is ever padded and
every answer is the one the prompt gets alone (padding would shift positions and masks).

Non-goals: other datasets, sampling, answer parsing beyond P2's normalisation.
"""

from __future__ import annotations

import logging
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bivlm_plugin.eval.vqa_data import VqaItem, easy_vqa_items

__all__ = [
    "P2",
    "VqaProtocol",
    "VqaResult",
    "normalize_answer",
    "p2_items",
    "P2_VAL",
    "PROTOCOLS",
    "evaluate_vqa",
    "plain_generate",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VqaProtocol:
    name: str
    split: str
    n_questions: int
    max_new_tokens: int


P2 = VqaProtocol(name="P2", split="test", n_questions=2000, max_new_tokens=8)
# For choosing settings without looking at P2: the reference VLM's held-out train images (the
# last ``VAL_IMAGES`` train images, never trained on or calibrated with), all their questions.
VAL_IMAGES = 200
P2_VAL = VqaProtocol(name="P2-val", split="train-heldout", n_questions=2000, max_new_tokens=8)
PROTOCOLS = {p.name: p for p in (P2, P2_VAL)}

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: ``" Red."`` -> ``"red"``."""
    return " ".join(text.lower().translate(_PUNCT).split())


def p2_items(limit: int | None = None, protocol: VqaProtocol = P2) -> list[VqaItem]:
    """The protocol's questions (the first ``limit`` of them, for quick looks)."""
    if limit is not None and not 0 < limit <= protocol.n_questions:
        raise ValueError(
            f"--limit must be in 1..{protocol.n_questions} (protocol {protocol.name}), got {limit}"
        )
    if protocol.split == "train-heldout":
        from bivlm_plugin.eval.vqa_data import easy_vqa_by_image

        held_out = list(easy_vqa_by_image("train").values())[-VAL_IMAGES:]
        return [q for qs in held_out for q in qs][: limit or protocol.n_questions]
    return easy_vqa_items(protocol.split, limit or protocol.n_questions)


def _kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in ("circle", "rectangle", "triangle"):
        return "shape"
    return "color"


@dataclass
class VqaResult:
    accuracy: float
    n_questions: int
    n_correct: int
    seconds: float
    accuracy_by_kind: dict[str, float]
    predictions: list[str] = field(repr=False)

    def to_dict(self, with_predictions: bool = True) -> dict:
        out = asdict(self)
        if not with_predictions:
            out.pop("predictions")
        return out


def prompt_for(processor, question: str) -> str:
    """The chat-template prompt of one image and one question (what P2 and `bivlm ask` send)."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    return processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)


def _encode(processor, items: list[VqaItem]) -> list[dict[str, torch.Tensor]]:
    from tqdm.auto import tqdm

    encoded = []
    for item in tqdm(items, desc="P2 prompts", unit="q", leave=False):
        encoded.append(
            processor(
                text=prompt_for(processor, item.question),
                images=[item.image()],
                return_tensors="pt",
            )
        )
    return encoded


def plain_generate(model, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """``model.generate`` returning the new tokens only: (B, new) int64."""
    return model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]


@torch.inference_mode()
def evaluate_vqa(
    model,
    processor,
    items: list[VqaItem],
    batch_size: int = 16,
    protocol: VqaProtocol = P2,
    generate: Callable[..., torch.Tensor] = plain_generate,
) -> VqaResult:
    """Greedy answers to ``items`` and their exact-match accuracy.

    Args:
        model: a transformers image-text-to-text model (dense or packed), in eval mode.
        processor: its processor (chat template, image processor, tokenizer).
        items: the questions, e.g. ``p2_items()``.
        batch_size: prompts per ``generate`` call (prompts of equal token length only).
        generate: ``(model, batch, **generate_kwargs) -> (B, new) ids``; e.g. visual-token
            pruning (``integrations.transformers.pruning.generate_with_pruning`` with the
            ratio and score bound).
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start = time.perf_counter()
    encoded = _encode(processor, items)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, enc in enumerate(encoded):
        by_length[enc["input_ids"].shape[1]].append(i)
    tok = processor.tokenizer
    predictions: list[str] = [""] * len(items)
    bar = tqdm(total=len(items), desc=f"{protocol.name} answers", unit="q")
    for _, idx in sorted(by_length.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            batch = {k: torch.cat([encoded[i][k] for i in chunk]) for k in encoded[chunk[0]].keys()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            new = generate(model, batch, max_new_tokens=protocol.max_new_tokens, do_sample=False)
            for i, row in zip(chunk, new, strict=True):
                predictions[i] = tok.decode(row, skip_special_tokens=True)
            bar.update(len(chunk))
    bar.close()
    hits = [
        normalize_answer(p) == normalize_answer(it.answer)
        for p, it in zip(predictions, items, strict=True)
    ]
    kinds = Counter(_kind(it.answer) for it in items)
    kind_hits = Counter(_kind(it.answer) for it, h in zip(items, hits, strict=True) if h)
    return VqaResult(
        accuracy=sum(hits) / len(items),
        n_questions=len(items),
        n_correct=sum(hits),
        seconds=time.perf_counter() - start,
        accuracy_by_kind={k: kind_hits[k] / n for k, n in sorted(kinds.items())},
        predictions=predictions,
    )


def load_vlm(model_dir: str | Path, dtype: torch.dtype | None = None):
    """A VLM folder (dense or packed ``bivlm-binary``) and its processor, ready for P2.

    ``dtype`` None: bfloat16 where the CPU runs it natively, else float32 (``utils.compute_dtype``).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import bivlm_plugin  # noqa: F401  (registers the packed-checkpoint quantizer)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir} is not a model folder (no config.json); pass the folder printed "
            "by `bivlm zoo build easyvqa-vlm` or written by `bivlm quantize`"
        )
    if getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is None:
        raise ValueError(
            f"--model {model_dir} is a text-only model (its config has no vision_config); "
            "protocol P2 needs a VLM. For text models use `bivlm eval ppl`."
        )
    processor = AutoProcessor.from_pretrained(model_dir)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"the processor in {model_dir} has no chat template; P2 formats each question with "
            "it. Save the processor with a chat_template."
        )
    if dtype is None:
        from bivlm_plugin.utils import torch_dtype

        dtype = torch_dtype()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, processor
