"""Render measured P1 runs (out/p1/NAME.json + NAME.cmd from scripts/p1_run.sh) as Markdown.

Usage: python scripts/p1_table.py out/p1/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    res = json.loads(path.read_text())
    q = res.get("quantization", {})
    cmd_file = path.with_suffix(".cmd")
    cmd = (
        cmd_file.read_text().strip()
        if cmd_file.is_file()
        else f"bivlm eval ppl --model {res['model']}"
    )
    date = res["environment"]["date"][:10]
    # What the folder holds (config.json), not what the report says: a run that straddled a
    # code change once wrote a packed checkpoint with an old report label.
    config = Path(res["model"]) / "config.json"
    qcfg = json.loads(config.read_text()).get("quantization_config", {}) if config.is_file() else {}
    fmt = {"bivlm-binary": "packed bivlm-binary", "pack-quantized": "packed (compressed-tensors)"}
    fmt = fmt.get(qcfg.get("format"), "bf16" if not qcfg else str(qcfg.get("format")))
    return (
        f"| {path.stem} | {q.get('method', 'fp')} | {q.get('weight_bits', 16):.3f} | "
        f"{q.get('storage_bits', 16):.3f} | **{res['ppl']:.2f}** | {q.get('seconds', 0):.0f} | "
        f"{fmt} | `{cmd}` | cpu2 | {date} |"
    )


if __name__ == "__main__":
    print(
        "| run | method | weight bits | storage bits | P1 ppl | quantize s | saved as | command "
        "| machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
