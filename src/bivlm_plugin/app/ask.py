"""``bivlm ask``: one image question to a VLM folder (FP or packed) through transformers, with
optional visual-token pruning.

Images are read here, not by the processor, so that what a processor may misread is settled
first: any PIL mode (grayscale, RGBA, palette, CMYK, 16-bit) becomes RGB (transparency over
white), and a file that is not an image fails naming the file. Sizes are the processor's
business (LLaVA's resizes and crops, Qwen2-VL's resizes to its patch grid): 1x1 and 4000x30
images answer like any other (``tests/test_ask.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

__all__ = ["ask", "load_image"]


def load_image(source: str | Path | bytes, name: str | None = None):
    """An RGB ``PIL.Image`` from a file path or encoded bytes (PNG, JPEG, WebP, ...).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the bytes are not an image PIL can decode (names the file, or ``name``).
    """
    from PIL import Image, UnidentifiedImageError

    label = name or (str(source) if not isinstance(source, bytes) else "the image bytes")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--image {path} does not exist")
        source = path.read_bytes()
    try:
        im = Image.open(io.BytesIO(source))
        im.load()  # decode now: a truncated file fails here, not inside the processor
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"{label} is not a readable image ({type(e).__name__}: {e}); pass a PNG, JPEG or "
            "WebP file"
        ) from e
    if im.width < 1 or im.height < 1:
        raise ValueError(f"{label} has no pixels ({im.width}x{im.height})")
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16/32-bit grayscale: scale to 8 bits over its own range (PIL's convert clips).
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.round().astype(np.uint8), mode="L").convert("RGB")
    return im.convert("RGB")


@torch.inference_mode()
def ask(
    model_dir: str | Path,
    image: str | Path | bytes,
    question: str,
    max_new_tokens: int = 16,
    prune_ratio: float = 0.0,
    prune_score: str = "feature_norm",
    prune_merge: bool = False,
    model_and_processor=None,
) -> str:
    """The greedy answer of the VLM in ``model_dir`` to ``question`` about ``image``.

    Args:
        model_dir: a VLM folder (``bivlm zoo build`` or ``bivlm quantize`` output).
        image: a path or encoded bytes (see ``load_image``).
        max_new_tokens: at least 1.
        prune_ratio, prune_score, prune_merge: visual-token pruning (ratio 0: none); with
            ``prune_merge`` the pruned tokens are merged into the kept ones.
        model_and_processor: ``(model, processor)`` already loaded from ``model_dir`` (tests,
            repeated questions); loaded with ``eval.vqa.load_vlm`` otherwise.
    """
    from bivlm_plugin.eval.vqa import load_vlm, plain_generate, prompt_for
    from bivlm_plugin.pruning.scores import SCORES, check_prune_merge, keep_count

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not question.strip():
        raise ValueError("--question is empty; ask something about the image")
    keep_count(1, prune_ratio)  # names the valid range
    if prune_score not in SCORES:
        raise ValueError(f"--prune-score {prune_score!r}: choose one of {sorted(SCORES)}")
    check_prune_merge(prune_ratio, prune_merge)
    im = load_image(image)
    model, processor = model_and_processor or load_vlm(model_dir)
    batch = dict(processor(text=prompt_for(processor, question), images=[im], return_tensors="pt"))
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if prune_ratio > 0:
        from bivlm_plugin.integrations.transformers.pruning import generate_with_pruning

        new = generate_with_pruning(
            model, batch, prune_ratio, prune_score, merge=prune_merge, **kwargs
        )
    else:
        new = plain_generate(model, batch, **kwargs)
    return processor.tokenizer.decode(new[0], skip_special_tokens=True)
