"""``bivlm ask`` and ``load_image``: images of unusual size and mode through transformers on
tiny random LLaVA and Qwen2-VL folders (with and without pruning), and files that are not
images failing with a message that names them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from bivlm_plugin.app.ask import ask, load_image
from tiny_vlms import save_llava_with_processor, save_qwen2_vl_with_processor


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _odd_images() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(40, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
    rgba = Image.fromarray(noise).convert("RGBA")
    rgba.putalpha(128)
    return {
        "1x1": _png(Image.new("RGB", (1, 1), (200, 10, 10))),
        "4000x30": _png(Image.fromarray(noise).resize((4000, 30))),
        "30x4000": _png(Image.fromarray(noise).resize((30, 4000))),
        "grayscale": _png(Image.fromarray(noise).convert("L")),
        "rgba": _png(rgba),
        "palette": _png(Image.fromarray(noise).convert("P")),
        "16-bit": _png(Image.fromarray(noise[:, :, 0].astype("uint16") * 257)),
        "cmyk-jpeg": _png(Image.fromarray(noise).convert("CMYK"), "JPEG"),
    }


ODD = _odd_images()


@pytest.mark.parametrize("name", sorted(ODD))
def test_load_image_gives_rgb_of_the_same_size(name) -> None:
    im = load_image(ODD[name], name)
    assert im.mode == "RGB"
    assert im.size == Image.open(io.BytesIO(ODD[name])).size


def test_load_image_alpha_is_composited_over_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_png(clear)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (2, 2), (0, 128))
    assert load_image(_png(half)).getpixel((0, 0)) == (127, 127, 127)


def test_load_image_16_bit_uses_its_range() -> None:
    a = torch.tensor([[0, 1000], [2000, 4000]], dtype=torch.int32).numpy().astype("uint16")
    im = load_image(_png(Image.fromarray(a)))
    assert [im.getpixel((x, y))[0] for y in (0, 1) for x in (0, 1)] == [0, 64, 128, 255]


def test_not_an_image_fails_naming_it(tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a PNG at all")
    with pytest.raises(ValueError, match=r"notes\.png is not a readable image.*PNG, JPEG"):
        load_image(bad)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(ODD["grayscale"][:60])
    with pytest.raises(ValueError, match=r"cut\.png is not a readable image"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="upload 3 is not a readable image"):
        load_image(b"\x89PNG\r\n\x1a\n garbage", "upload 3")


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny_vlm(request, tmp_path_factory):
    from bivlm_plugin.eval.vqa import load_vlm

    path = tmp_path_factory.mktemp(request.param)
    save = {"llava": save_llava_with_processor, "qwen2_vl": save_qwen2_vl_with_processor}
    save[request.param](path)
    return path, load_vlm(path, dtype=torch.float32)


@pytest.mark.parametrize("prune_ratio", [0.0, 0.5])
def test_odd_images_are_answered(tiny_vlm, prune_ratio) -> None:
    """Every odd image gets an answer of the requested length, pruned or not (random weights:
    the answer's content means nothing; that it comes back, deterministically, does)."""
    path, loaded = tiny_vlm
    for name, data in ODD.items():
        a = ask(path, data, "what shape?", max_new_tokens=3, prune_ratio=prune_ratio,
                model_and_processor=loaded)  # fmt: skip
        assert isinstance(a, str), name
        again = ask(path, data, "what shape?", max_new_tokens=3, prune_ratio=prune_ratio,
                    model_and_processor=loaded)  # fmt: skip
        assert a == again, name


def test_ask_cli_and_its_errors(tiny_vlm, tmp_path, capsys) -> None:
    from bivlm_plugin.cli import main

    path, loaded = tiny_vlm
    img = tmp_path / "wide.png"
    img.write_bytes(ODD["4000x30"])
    assert main(["ask", "--model", str(path), "--image", str(img), "--question", "what?"]) == 0
    # The CLI prints what ask() answers (its own load: bf16, so compare with a bf16 load).
    from bivlm_plugin.eval.vqa import load_vlm

    want = ask(path, img, "what?", model_and_processor=load_vlm(path))
    assert capsys.readouterr().out == want + "\n"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    for argv, msg in [
        (["--image", str(bad), "--question", "what?"], "bad.jpg is not a readable image"),
        (["--image", str(img), "--question", "  "], "--question is empty"),
        (["--image", str(img), "--question", "q", "--prune-ratio", "1.0"], "prune"),
        (["--image", str(img), "--question", "q", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--image", str(img), "--question", "q", "--prune-score", "nope"], "'nope'"),
        (["--image", str(img), "--question", "q", "--prune-merge"], "--prune-merge needs"),
    ]:
        assert main(["ask", "--model", str(path), *argv]) == 2
        assert msg in capsys.readouterr().err, argv
    assert main(["ask", "--model", str(Path(tmp_path) / "none"), "--image", str(img),
                 "--question", "q"]) == 2  # fmt: skip
    assert "not a model folder" in capsys.readouterr().err
