"""easy-VQA (PyPI ``easy-vqa==1.0``, MIT): image-question-answer triples.

Used for VLM calibration (train split) and protocol P2 (test split: the first 2,000 questions in
file order). Images are 64x64 PNGs of one coloured shape; 13 possible answers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VqaItem", "easy_vqa_by_image", "easy_vqa_items"]


@dataclass(frozen=True)
class VqaItem:
    image_path: Path
    question: str
    answer: str

    def image(self):
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def _root() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("easy-VQA data needs `pip install easy-vqa==1.0`")
    return Path(spec.origin).parent / "data"


def easy_vqa_items(split: str, limit: int | None = None) -> list[VqaItem]:
    """The first ``limit`` questions of a split, in file order."""
    import json

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    root = _root() / split
    rows = json.loads((root / "questions.json").read_text())
    rows = rows if limit is None else rows[:limit]
    return [VqaItem(root / "images" / f"{image_id}.png", q, a) for q, a, image_id in rows]


def easy_vqa_by_image(split: str) -> dict[Path, list[VqaItem]]:
    """Every question of a split grouped by image, images in order of first appearance."""
    by_image: dict[Path, list[VqaItem]] = {}
    for item in easy_vqa_items(split):
        by_image.setdefault(item.image_path, []).append(item)
    return by_image
