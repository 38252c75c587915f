"""Protocol P2 harness (``bivlm eval vqa``) and the reference-VLM builder's pieces, on tiny
random LLaVA models built in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

from bivlm_plugin.eval.vqa import P2, evaluate_vqa, load_vlm, normalize_answer, p2_items  # noqa: E402
from tiny_vlms import IMAGE_TOKEN, _llava_model, save_llava_with_processor  # noqa: E402


def test_normalize_answer() -> None:
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("YES!") == "yes"
    assert normalize_answer("a  circle,\n") == "a circle"
    assert normalize_answer("") == ""


def test_p2_items_are_the_first_2000_test_questions() -> None:
    items = p2_items()
    assert len(items) == P2.n_questions == 2000
    first = (items[0].question, items[0].answer)
    assert first == ("what is the red shape?", "triangle")  # file order
    assert all("test" in str(it.image_path) for it in items[:10])
    assert len(p2_items(5)) == 5
    for bad in (0, -1, 2001):
        with pytest.raises(ValueError, match="--limit must be in 1..2000"):
            p2_items(bad)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava_p2")
    save_llava_with_processor(path)
    return path


def test_batched_answers_equal_one_by_one(tiny_llava_dir: Path) -> None:
    """Equal-length batches never pad, so every answer is the one its prompt gets alone."""
    model, processor = load_vlm(tiny_llava_dir, dtype=torch.float32)
    items = p2_items(12)
    batched = evaluate_vqa(model, processor, items, batch_size=8)
    alone = evaluate_vqa(model, processor, items, batch_size=1)
    assert batched.predictions == alone.predictions
    assert batched.n_questions == 12
    pairs = zip(alone.predictions, items, strict=True)
    want = sum(normalize_answer(p) == it.answer for p, it in pairs)
    assert batched.n_correct == want
    assert set(batched.accuracy_by_kind) <= {"yes/no", "shape", "color"}


def test_cli_eval_vqa_json(tiny_llava_dir: Path, tmp_path: Path, capsys) -> None:
    from bivlm_plugin.cli import main

    out = tmp_path / "p2.json"
    argv = ["eval", "vqa", "--model", str(tiny_llava_dir), "--limit", "4", "--dtype", "float32"]
    assert main(argv + ["--json", str(out)]) == 0
    assert "P2 accuracy" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for key in ("accuracy", "n_questions", "prune_ratio", "seconds", "model", "protocol"):
        assert key in res
    assert res["n_questions"] == 4 and res["prune_ratio"] == 0.0 and res["protocol"] == "P2"
    assert len(res["predictions"]) == 4


def test_cli_eval_vqa_rejects_text_models_and_bad_limits(tiny_llama_dir, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["eval", "vqa", "--model", str(tiny_llama_dir), "--limit", "2"]) == 2
    assert "text-only model" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", str(tiny_llama_dir), "--limit", "0"]) == 2
    assert "--limit must be in 1..2000" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", "/no/such/dir"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_packed_answer_logits_equal_single_turn_forward() -> None:
    """Shared-prefix packing (training of the reference VLM) computes exactly what each
    single-turn prompt computes: logits at every block position match a plain forward."""
    from bivlm_plugin.zoo.easyvqa_vlm import packed_answer_logits

    torch.manual_seed(0)
    model = _llava_model().eval()
    gen = torch.Generator().manual_seed(1)
    prefix = [1, 5, *([IMAGE_TOKEN] * 16)]  # 32x32 image, 8x8 patches: 16 image tokens
    blocks = [
        [torch.randint(3, 140, (n,), generator=gen).tolist() for n in (5, 9, 3)],
        [torch.randint(3, 140, (n,), generator=gen).tolist() for n in (7,)],
    ]
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    positions = [[list(range(len(b))) for b in row] for row in blocks]
    with torch.no_grad():
        got = packed_answer_logits(model, pixels, prefix, blocks, positions)
        want = []
        for b, row in enumerate(blocks):
            for block in row:
                ids = torch.tensor([prefix + block])
                logits = model(input_ids=ids, pixel_values=pixels[b : b + 1]).logits[0]
                want.append(logits[len(prefix) :])
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=1e-4)


def test_labels_from_train_questions() -> None:
    from bivlm_plugin.zoo.easyvqa_vlm import COLORS, SHAPES, _labels

    assert _labels([("what shape is in the image?", "circle")]) == (SHAPES.index("circle"), -1)
    assert _labels([("what is the blue shape?", "triangle")]) == (2, COLORS.index("blue"))
    assert _labels([("is there not a red shape?", "no")]) == (-1, COLORS.index("red"))
    assert _labels([("is there not a red shape?", "yes")]) == (-1, -1)
    assert _labels([("is no circle present?", "no")]) == (0, -1)
    assert _labels([("does the image contain a rectangle?", "yes")]) == (1, -1)


def test_evaluate_vqa_answers_through_the_generate_it_is_given(tiny_llava_dir: Path) -> None:
    """The ``generate`` argument (e.g. pruned generation) is what produces the answers."""
    model, processor = load_vlm(tiny_llava_dir, dtype=torch.float32)
    items = p2_items(6)
    yes = processor.tokenizer("yes", add_special_tokens=False).input_ids
    calls = []

    def fake(model, batch, **kwargs):
        calls.append(batch["input_ids"].shape[0])
        return torch.tensor([yes] * batch["input_ids"].shape[0])

    res = evaluate_vqa(model, processor, items, batch_size=4, generate=fake)
    assert sum(calls) == 6
    assert {normalize_answer(p) for p in res.predictions} == {"yes"}
    assert res.n_correct == sum(it.answer == "yes" for it in items)


def test_cli_eval_vqa_prunes_when_asked(tiny_llava_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """``--prune-ratio`` reaches generation: the pruned path is called with ratio and score."""
    from bivlm_plugin.cli import main
    from bivlm_plugin.integrations.transformers import pruning

    seen = []
    real = pruning.generate_with_pruning

    def spy(model, inputs, prune_ratio, prune_score="cls_attention", merge=False, **kw):
        seen.append((prune_ratio, prune_score, merge))
        return real(model, inputs, prune_ratio, prune_score, merge, **kw)

    monkeypatch.setattr(pruning, "generate_with_pruning", spy)
    out = tmp_path / "p2.json"
    argv = ["eval", "vqa", "--model", str(tiny_llava_dir), "--limit", "3", "--dtype", "float32"]
    argv += ["--prune-ratio", "0.75", "--prune-score", "feature_norm", "--json", str(out)]
    assert main(argv) == 0
    assert seen and set(seen) == {(0.75, "feature_norm", False)}
    res = json.loads(out.read_text())
    assert res["prune_ratio"] == 0.75 and res["prune_score"] == "feature_norm"
    assert res["prune_merge"] is False
    seen.clear()
    assert main([*argv, "--prune-merge"]) == 0
    assert seen and set(seen) == {(0.75, "feature_norm", True)}
    assert json.loads(out.read_text())["prune_merge"] is True
    no_ratio = ["eval", "vqa", "--model", str(tiny_llava_dir), "--limit", "1", "--prune-merge"]
    assert main(no_ratio) == 2


def test_p2_val_is_the_held_out_train_images() -> None:
    from bivlm_plugin.eval.vqa import P2_VAL, VAL_IMAGES
    from bivlm_plugin.eval.vqa_data import easy_vqa_by_image
    from bivlm_plugin.zoo.easyvqa_vlm import REFERENCE

    assert REFERENCE.val_images == VAL_IMAGES  # the images the build holds out
    items = p2_items(protocol=P2_VAL)
    held_out = set(list(easy_vqa_by_image("train"))[-VAL_IMAGES:])
    assert items and {it.image_path for it in items} <= held_out
    assert all("train" in str(it.image_path) for it in items)
    assert len(items) <= P2_VAL.n_questions
