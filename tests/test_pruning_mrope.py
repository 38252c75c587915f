"""M-RoPE positions of a pruned Qwen prompt (``pruning/mrope.py``): by hand, against
transformers' ``get_rope_index`` + ``pruned_position_ids`` (the exactness oracle of the vLLM
hook), against vLLM's own layout when nothing is pruned (videos with a temporal stride too), and
its refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bivlm_plugin.pruning.mrope import MediaSpan, pruned_mrope_positions
from bivlm_plugin.pruning.scores import keep_count
from tiny_vlms import IMAGE_TOKEN, _qwen2_vl_model

VISION_START, VISION_END = IMAGE_TOKEN + 2, IMAGE_TOKEN + 3


def test_hand_written_layout() -> None:
    # 2 text, a 1x2x3 image keeping tokens 1 and 4, 3 text.
    kept = torch.tensor([1, 4])
    pos, delta = pruned_mrope_positions(7, [MediaSpan(2, (1, 2, 3), kept)])
    want = torch.tensor(
        [
            [0, 1, 2, 2, 5, 6, 7],  # t
            [0, 1, 2, 3, 5, 6, 7],  # h: token 1 is (0, 0, 1), token 4 is (0, 1, 1)
            [0, 1, 3, 3, 5, 6, 7],  # w; the text resumes after the FULL grid (2 + 2 + 1)
        ]
    )
    assert pos.tolist() == want.tolist()
    assert delta == 1  # the first new token (index 7) sits at 8 = max + 1


def _prompt(grids_merged: list[tuple[int, int]], text: list[int], gen) -> torch.Tensor:
    """text[0] tokens, then per image <|vision_start|> h*w image tokens <|vision_end|> and
    text[i + 1] tokens; (1, T) ids."""
    parts = [torch.randint(3, 140, (text[0],), generator=gen)]
    for (h, w), after in zip(grids_merged, text[1:], strict=True):
        parts += [torch.tensor([VISION_START]), torch.full((h * w,), IMAGE_TOKEN)]
        parts += [torch.tensor([VISION_END]), torch.randint(3, 140, (after,), generator=gen)]
    return torch.cat(parts)[None]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_matches_transformers_pruned_positions(ratio: float) -> None:
    """Two images of awkward grids (3x5 and 4x2 merged tokens), random kept subsets: the
    positions and delta equal what transformers' pruning computes from get_rope_index on the
    unpruned prompt (rows 1-3 of pruned_position_ids, rope_deltas)."""
    from bivlm_plugin.integrations.transformers.pruning import pruned_position_ids

    torch.manual_seed(0)
    model = _qwen2_vl_model().eval()
    gen = torch.Generator().manual_seed(1)
    merged = [(3, 5), (4, 2)]
    ids = _prompt(merged, [4, 3, 2], gen)
    grid = torch.tensor([[1, 2 * h, 2 * w] for h, w in merged])  # patches, before the 2x2 merge
    mask = torch.ones_like(ids)
    positions, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == IMAGE_TOKEN).long(), image_grid_thw=grid, attention_mask=mask
    )
    image = ids[0] == IMAGE_TOKEN
    kept = []
    for h, w in merged:
        n = h * w
        kept.append(torch.randperm(n, generator=gen)[: keep_count(n, ratio)].sort().values)
    keep = ~image  # text stays; each image keeps its ``kept`` tokens
    starts = torch.nonzero(ids[0] == VISION_START).flatten() + 1
    for s, k in zip(starts.tolist(), kept, strict=True):
        keep[s + k] = True
    want_pos, want_delta = pruned_position_ids(positions, keep[None], mask)

    pruned_ids = ids[0][keep]
    offsets = (torch.nonzero(pruned_ids == VISION_START).flatten() + 1).tolist()
    spans = [MediaSpan(o, (1, h, w), k) for o, (h, w), k in zip(offsets, merged, kept, strict=True)]
    got_pos, got_delta = pruned_mrope_positions(pruned_ids.numel(), spans)
    assert got_pos.tolist() == want_pos[1:, 0].tolist()
    assert got_delta == int(want_delta)
    if ratio == 0.0:  # kept=None is the same as keeping everything
        all_kept = [replace(s, kept=None) for s in spans]
        assert (
            pruned_mrope_positions(ids.shape[1], all_kept)[0].tolist() == positions[:, 0].tolist()
        )


def test_unpruned_equals_vllm_layout() -> None:
    """Nothing pruned: vLLM's own Qwen2-VL get_mrope_input_positions (images, and a video
    with a temporal stride of 2.5) gives the same positions and delta."""
    qwen2_vl = pytest.importorskip(
        "vllm.model_executor.models.qwen2_vl",
        reason="needs vLLM (pip install 'bivlm-plugin[vllm]')",
    )
    from types import SimpleNamespace

    media = [(3, 1, 2, 3, 1.0), (12, 3, 2, 2, 2.5), (30, 1, 4, 1, 1.0)]  # offset, t, h, w, t_f
    n_tokens = 37
    fake = SimpleNamespace(iter_mm_grid_thw=lambda _features: iter(media))
    cls = qwen2_vl.Qwen2VLForConditionalGeneration
    want_pos, want_delta = cls.get_mrope_input_positions(fake, list(range(n_tokens)), [])
    spans = [MediaSpan(o, (t, h, w), None, f) for o, t, h, w, f in media]
    got_pos, got_delta = pruned_mrope_positions(n_tokens, spans)
    assert got_pos.tolist() == want_pos.tolist()
    assert got_delta == want_delta


@pytest.mark.parametrize(
    "n, spans, message",
    [
        (10, [MediaSpan(0, (1, 2, 2)), MediaSpan(3, (1, 1, 1))], "overlap"),
        (5, [MediaSpan(2, (1, 2, 2))], "past the prompt's 5"),
        (9, [MediaSpan(0, (1, 2, 2), torch.tensor([2, 1]))], "ascending"),
        (9, [MediaSpan(0, (1, 2, 2), torch.tensor([0, 4]))], r"in \[0, 4\)"),
        (9, [MediaSpan(0, (1, 2, 2), torch.tensor([], dtype=torch.long))], "non-empty"),
    ],
)
def test_refusals_name_the_problem(n, spans, message) -> None:
    with pytest.raises(ValueError, match=message):
        pruned_mrope_positions(n, spans)
