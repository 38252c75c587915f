"""Render measured P1 runs (out/p1/*.json from scripts/p1_run.sh) as Markdown table rows.

Usage: python scripts/p1_table.py out/p1/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    res = json.loads(path.read_text())
    q = res.get("quantization", {})
    date = res["environment"]["date"][:10]
    overrides = ""
    mods = next(iter(next(iter(q.get("recipe", {}).values()), {}).values()), {})
    for args in mods.values():
        overrides = ", ".join(
            f"{k}={v}"
            for k, v in sorted(args.items())
            if k not in ("targets", "ignore", "config_groups")
        )
    return (
        f"| {path.stem} | {q.get('method', 'fp')} | {q.get('weight_bits', 16):.3f} | "
        f"{q.get('storage_bits', 16):.3f} | {res['ppl']:.2f} | {q.get('seconds', 0):.0f} | "
        f"{overrides} | {date} |"
    )


if __name__ == "__main__":
    print("| run | method | weight bits | storage bits | P1 ppl | quantize s | settings | date |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
