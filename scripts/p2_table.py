"""Render reference-VLM runs (scripts/p2_run.sh: out/p2/NAME.{p2,p1}.json + NAME.cmd) as Markdown.

Usage: python scripts/p2_table.py out/p2/*.p2.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(p2_path: Path) -> str:
    name = p2_path.name.removesuffix(".p2.json")
    res = json.loads(p2_path.read_text())
    p1_path = p2_path.with_name(f"{name}.p1.json")
    ppl = json.loads(p1_path.read_text())["ppl"] if p1_path.is_file() else float("nan")
    q = res.get("quantization", {})
    cmd_file = p2_path.with_name(f"{name}.cmd")
    cmd = cmd_file.read_text().strip() if cmd_file.is_file() else ""
    scope = {"language": "LM only", "all": "whole VLM"}
    recipe = q.get("recipe", {})
    mods = [m for stage in recipe.values() for group in stage.values() for m in group.values()]
    setting = scope.get((mods[0] or {}).get("scope"), "") if mods else "-"
    if mods and "GPTQModifier" in json.dumps(recipe):
        setting = "whole VLM" if "vision_tower" not in json.dumps(recipe) else "LM only"
    files = q.get("storage_bits_from_files")
    packed = p2_path.with_name(f"{name}.packed") / "bivlm_report.json"
    if files is None and packed.is_file():  # GPTQ rows: the packed save of the same run
        files = json.loads(packed.read_text()).get("storage_bits_from_files")
    storage = f"{files:.3f}" if files is not None else f"{q.get('storage_bits', 16):.3f}"
    kinds = res.get("accuracy_by_kind", {})
    by_kind = " / ".join(f"{kinds.get(k, float('nan')):.3f}" for k in ("yes/no", "shape", "color"))
    return (
        f"| {name} | {setting} | {q.get('method', 'fp')} | {q.get('weight_bits', 16):.3f} | "
        f"{storage} | **{res['accuracy']:.4f}** ({res['n_correct']}/{res['n_questions']}) | "
        f"{by_kind} | {ppl:.2f} | {q.get('seconds', 0):.0f} | `{cmd}` | cpu2 | "
        f"{res['environment']['date'][:10]} |"
    )


if __name__ == "__main__":
    print(
        "| run | setting | method | weight bits | storage bits (files) | P2 accuracy | "
        "yes-no / shape / color | P1 ppl (LM) | quantize s | command | machine | date |"
    )
    print("|" + "---|" * 12)
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
