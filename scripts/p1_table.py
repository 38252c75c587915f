"""Render measured P1 runs (out/p1/NAME.json + NAME.cmd from scripts/p1_run.sh) as Markdown.

Usage: python scripts/p1_table.py [--machine NAME] out/p1/*.json

The storage column is the figure read from the saved files (``storage_bits_from_files``) where
the run wrote a packed checkpoint, else the quantizer's own count, marked with ``*``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def storage(q: dict) -> str:
    if q.get("storage_bits_from_files") is not None:
        return f"{q['storage_bits_from_files']:.3f}"
    return f"{q.get('storage_bits', 16):.3f}" + ("*" if q else "")


def row(path: Path, machine: str) -> str:
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
    # Where the folder is gone (a fresh clone of docs/measurements), the report's label.
    config = Path(res["model"]) / "config.json"
    names = {"bivlm-binary": "packed bivlm-binary", "pack-quantized": "packed (compressed-tensors)"}
    if config.is_file():
        qcfg = json.loads(config.read_text()).get("quantization_config", {})
        fmt = names.get(qcfg.get("format"), "bf16" if not qcfg else str(qcfg.get("format")))
    else:
        label = q.get("format", "")
        fmt = names.get(label, "packed (compressed-tensors)" if "compressed" in label else "bf16")
    env = res["environment"]
    cap = str(env.get("cpu_capability", "?")).lower()
    machine = machine or f"cpu{env.get('cpus', '?')}-{cap}"
    calib = q.get("calibration_dtype", "-")
    return (
        f"| {path.stem} | {q.get('method', 'fp')} | {q.get('weight_bits', 16):.3f} | "
        f"{storage(q)} | **{res['ppl']:.2f}** | {q.get('seconds', 0):.0f} | {calib} | "
        f"{fmt} | `{cmd}` | {machine} | {date} |"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--machine", default=None, help="machine label for the rows (default: from each JSON)"
    )
    ap.add_argument("json", nargs="+", type=Path)
    args = ap.parse_args()
    print(
        "| run | method | weight bits | storage bits | P1 ppl | quantize s | calibrated in "
        "| saved as | command | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.json:
        print(row(path, args.machine))
