"""``bivlm report``: per-layer bits and errors of quantized checkpoints, and the result plots.

Reads what the other commands write, nothing else:

- a quantized folder's ``bivlm_report.json`` (``bivlm quantize``, or ``write_quant_report``
  after ``oneshot``): one row per quantized layer (part, shape, weight bits, storage bits as
  counted and as read from the saved files, calibration-weighted error, relative error, the
  salient share and rings Bi-VLM chose), a per-part summary and the layers with the largest
  relative error;
- evaluation JSONs of ``bivlm eval ppl`` (P1) and ``bivlm eval vqa`` (P2), which embed the
  quantization report of the folder they measured: one point per model folder in
  ``p1_vs_bits.png`` / ``p2_vs_bits.png`` (storage bits per weight on x, one colour per method,
  the unquantized model at 16 bits);
- ``prune_study.json`` of ``bivlm analyze pruning``: the pruning curve (``pruning.png``).

Each path given is one of those files, a checkpoint folder, or a folder searched recursively for
them. JSON files of any other kind found in a folder are skipped and counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bivlm_plugin.utils import atomic_write_text, save_figure

__all__ = [
    "Results",
    "collect",
    "layer_rows",
    "layer_table",
    "part_summary",
    "method_points",
    "methods_table",
    "plot_metric_vs_bits",
    "write_report",
]

REPORT_FILE = "bivlm_report.json"
FP_BITS = 16.0  # the unquantized (bf16) model's point


@dataclass
class Results:
    """What ``collect`` found: quantization reports, P1 / P2 evaluations and pruning studies."""

    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> report
    p1: list[dict[str, Any]] = field(default_factory=list)
    p2: list[dict[str, Any]] = field(default_factory=list)
    pruning: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # JSON files of another kind

    def empty(self) -> bool:
        return not (self.reports or self.p1 or self.p2 or self.pruning)


def _kind(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    protocol = str(payload.get("protocol", ""))
    if "ppl" in payload and protocol.startswith("P1"):
        return "p1"
    if "accuracy" in payload and protocol.startswith("P2"):
        return "p2"
    rows = payload.get("rows")
    if isinstance(rows, list) and rows and {"ratio", "score", "accuracy"} <= set(rows[0]):
        return "pruning"
    if isinstance(payload.get("layers"), list) and "method" in payload and "n_layers" in payload:
        return "report"
    return None


def _name(path: Path) -> str:
    """``vlm_bivlm_w2`` for ``vlm_bivlm_w2.p2.json``; a report's name is its folder's."""
    if path.name == REPORT_FILE:
        return path.parent.name
    stem = path.name.removesuffix(".json")
    for suffix in (".p1", ".p2", ".ppl", ".vqa"):
        stem = stem.removesuffix(suffix)
    return stem


def collect(paths: Iterable[str | Path]) -> Results:
    """Read every report, evaluation and pruning study under ``paths``.

    Raises FileNotFoundError naming a path that does not exist, and ValueError naming a JSON
    file given explicitly that is none of the kinds above, or that is not valid JSON.
    """
    out = Results()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such file or folder; give a quantized checkpoint folder, an "
                "evaluation JSON (bivlm eval ... --json), a prune_study.json or a folder of them"
            )
        explicit = path.is_file()
        files = [path] if explicit else sorted(path.rglob("*.json"))
        for f in files:
            try:
                payload = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                if explicit:
                    raise ValueError(f"{f}: not a readable JSON file ({exc})") from exc
                out.skipped.append(f)
                continue
            kind = _kind(payload)
            if kind is None:
                if explicit:
                    raise ValueError(
                        f"{f} is not a quantization report, a P1 / P2 evaluation or a "
                        "prune_study.json: bivlm report reads what bivlm quantize, bivlm eval "
                        "... --json and bivlm analyze pruning write"
                    )
                out.skipped.append(f)
                continue
            payload = {**payload, "_file": str(f), "_name": _name(f)}
            if kind == "report":
                out.reports[payload["_name"]] = payload
            else:
                getattr(out, kind).append(payload)
    return out


# -- per-layer table ---------------------------------------------------------------------------


def layer_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per quantized layer of a quantization report."""
    rows = []
    for layer in report.get("layers", []):
        info = layer.get("info") or {}
        shape = layer.get("shape") or []
        rows.append(
            {
                "name": layer["name"],
                "part": layer.get("part", ""),
                "shape": "x".join(map(str, shape)),
                "n_weights": math.prod(shape) if shape else 0,
                "method": layer.get("method", report.get("method", "")),
                "weight_bits": layer.get("weight_bits"),
                "storage_bits": layer.get("storage_bits"),
                "storage_bits_from_files": layer.get("storage_bits_from_files"),
                "error": layer.get("error"),
                "relative_error": info.get("relative_error"),
                "p_sal": info.get("p_sal"),
                "n_rings": info.get("n_rings"),
            }
        )
    return rows


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _markdown(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table: the header row, the rule, one line per row."""
    rule = "|" + "---|" * len(header)
    lines = [f"| {' | '.join(cells)} |" for cells in (header, *rows)]
    return "\n".join([lines[0], rule, *lines[1:]]) + "\n"


def layer_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per layer."""
    header = ["layer", "part", "shape", "weight bits", "storage bits", "in files", "error"]
    return _markdown(
        [*header, "rel. error", "p_sal", "rings"],
        (
            [
                r["name"],
                r["part"] or "-",
                r["shape"],
                _fmt(r["weight_bits"], ".3f"),
                _fmt(r["storage_bits"], ".3f"),
                _fmt(r["storage_bits_from_files"], ".3f"),
                _fmt(r["error"]),
                _fmt(r["relative_error"]),
                _fmt(r["p_sal"]),
                _fmt(r["n_rings"]),
            ]
            for r in rows
        ),
    )


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(r[key], r["n_weights"]) for r in rows if r[key] is not None and r["n_weights"]]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def part_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per part (vision / projector / language, or "all" when the report has no parts):
    layer and weight counts, weight-averaged bits, mean and largest relative error."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        parts.setdefault(r["part"] or "all", []).append(r)
    if len(parts) > 1:
        parts["all"] = rows
    out = []
    for part, group in parts.items():
        rel = [r["relative_error"] for r in group if r["relative_error"] is not None]
        out.append(
            {
                "part": part,
                "layers": len(group),
                "weights": sum(r["n_weights"] for r in group),
                "weight_bits": _weighted(group, "weight_bits"),
                "storage_bits": _weighted(group, "storage_bits"),
                "storage_bits_from_files": _weighted(group, "storage_bits_from_files"),
                "mean_relative_error": sum(rel) / len(rel) if rel else None,
                "max_relative_error": max(rel) if rel else None,
            }
        )
    return out


def _summary_table(summary: list[dict[str, Any]]) -> str:
    header = ["part", "layers", "weights", "weight bits", "storage bits", "in files"]
    return _markdown(
        [*header, "mean rel. error", "max rel. error"],
        (
            [
                s["part"],
                str(s["layers"]),
                f"{s['weights']:,}",
                _fmt(s["weight_bits"], ".3f"),
                _fmt(s["storage_bits"], ".3f"),
                _fmt(s["storage_bits_from_files"], ".3f"),
                _fmt(s["mean_relative_error"]),
                _fmt(s["max_relative_error"]),
            ]
            for s in summary
        ),
    )


# -- methods and plots -------------------------------------------------------------------------


def _bits(q: Mapping[str, Any] | None) -> float:
    """Storage bits per weight of an evaluated model: from the files when counted, else the
    report's count; the unquantized model is plotted at 16."""
    if not q:
        return FP_BITS
    files = q.get("storage_bits_from_files")
    return float(files if files is not None else q["storage_bits"])


def method_points(results: Results) -> list[dict[str, Any]]:
    """One point per evaluated model folder (and pruning setting): name, method, bits, P1, P2.

    P1 and P2 of the same model folder, written side by side, merge into one point; a P2
    measured with pruning on, or on a subset of the questions, is its own point and says so in
    its label. Two points of the same name (one folder re-quantized, evaluated into two result
    folders) are told apart by their result folder's name.
    """
    points: dict[tuple[str, str, float, Any], dict[str, Any]] = {}

    def point(res: Mapping[str, Any], ratio: float = 0.0, limit: Any = None) -> dict[str, Any]:
        q = res.get("quantization")
        where = str(Path(res["_file"]).parent)
        key = (str(res.get("model", res["_name"])), where, ratio, limit)
        if key not in points:
            label = res["_name"] if q else f"{res['_name']} (unquantized)"
            if ratio:
                label += f" r={ratio:g} {res.get('prune_score') or ''}".rstrip()
            if limit:
                label += f" (first {limit})"
            points[key] = {
                "name": label,
                "model": key[0],
                "folder": where,
                "method": (q or {}).get("method", "fp"),
                "storage_bits": _bits(q),
                "weight_bits": (q or {}).get("weight_bits", FP_BITS),
                "p1": None,
                "p2": None,
                "p1_file": None,
                "p2_file": None,
            }
        return points[key]

    for res in results.p1:
        p = point(res)
        p["p1"], p["p1_file"] = float(res["ppl"]), res["_file"]
    for res in results.p2:
        p = point(res, float(res.get("prune_ratio") or 0.0), res.get("limit"))
        p["p2"], p["p2_file"] = float(res["accuracy"]), res["_file"]
    out = sorted(points.values(), key=lambda p: (p["storage_bits"], p["name"]))
    names = [p["name"] for p in out]
    for p in out:
        if names.count(p["name"]) > 1:
            p["name"] += f" [{Path(p['folder']).name}]"
    return out


def methods_table(points: list[dict[str, Any]]) -> str:
    return _markdown(
        ["model", "method", "weight bits", "storage bits", "P1 ppl", "P2 accuracy"],
        (
            [
                p["name"],
                p["method"],
                f"{p['weight_bits']:.3f}",
                f"{p['storage_bits']:.3f}",
                _fmt(p["p1"], ",.2f"),
                _fmt(p["p2"], ".4f"),
            ]
            for p in points
        ),
    )


def plot_metric_vs_bits(points: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """``metric`` ("p1" or "p2") against storage bits: one point per run, one colour per method
    and, for a method with runs at several storage budgets, its curve through the best run at
    each budget (ablations at one budget stay points); False when no point has the metric
    (nothing is written)."""
    pts = [p for p in points if p[metric] is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({p["method"] for p in pts})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for m in methods:
        group = [p for p in pts if p["method"] == m]
        ax.scatter(
            [p["storage_bits"] for p in group],
            [p[metric] for p in group],
            color=colors[m],
            label=m,
            zorder=3,
        )
        # One budget = storage bits equal to 0.01 (runs at one recipe's budget differ by a few
        # thousandths); the curve goes through the best run of each, at that run's bits.
        best: dict[float, dict[str, Any]] = {}
        for p in group:
            x = round(p["storage_bits"], 2)
            old = best.get(x)
            if old is None or (p[metric] < old[metric]) == (metric == "p1"):
                best[x] = p
        if len(best) > 1:
            run = [best[x] for x in sorted(best)]
            ax.plot(
                [p["storage_bits"] for p in run],
                [p[metric] for p in run],
                color=colors[m],
                alpha=0.6,
                zorder=2,
            )
    for p in pts:
        ax.annotate(
            p["name"],
            (p["storage_bits"], p[metric]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    if metric == "p1":
        ax.set_yscale("log")
        ax.set_ylabel("P1 perplexity (WikiText-2 test, log scale; lower is better)")
    else:
        ax.set_ylabel("P2 accuracy (easy-VQA test; higher is better)")
    # Log x: the ultra-low-bit points (1-3 bits) spread out beside the unquantized one at 16.
    ax.set_xscale("log", base=2)
    ticks = [t for t in (1, 1.5, 2, 3, 4, 8, 16) if min(p["storage_bits"] for p in pts) / 1.2 <= t]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("storage bits per weight (log scale; every stored tensor counted; FP at 16)")
    ax.set_title(f"{metric.upper()} vs storage bits, {len(pts)} models")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def write_report(results: Results, out_dir: Path, top: int = 5) -> tuple[str, list[Path]]:
    """The text ``bivlm report`` prints (Markdown) and the PNG files it wrote to ``out_dir``.

    Also writes the text as ``out_dir / "report.md"``.
    """
    from bivlm_plugin.app.prune_study import plot_sweep

    sections: list[str] = []
    written: list[Path] = []
    for name, report in results.reports.items():
        rows = layer_rows(report)
        files = report.get("storage_bits_from_files")
        sections.append(
            f"## {name}: {report['method']}, {len(rows)} layers, "
            f"{report.get('storage_bits', float('nan')):.3f} storage bits per weight"
            + (f" ({files:.3f} in the files)" if files is not None else "")
            + f"\n\n{report['_file']}\n\n"
            + _summary_table(part_summary(rows))
        )
        key = "relative_error" if any(r["relative_error"] is not None for r in rows) else "error"
        ranked = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=True)
        if ranked:
            sections.append(
                f"Largest {key.replace('_', ' ')} ({min(top, len(ranked))} of {len(rows)}):\n\n"
                + layer_table(ranked[:top])
            )
        sections.append("Every layer:\n\n" + layer_table(rows))
    points = method_points(results)
    if points:
        sections.append("## Evaluated models\n\n" + methods_table(points))
        for metric in ("p1", "p2"):
            path = out_dir / f"{metric}_vs_bits.png"
            if plot_metric_vs_bits(points, metric, path):
                written.append(path)
    for i, study in enumerate(results.pruning):
        path = out_dir / ("pruning.png" if i == 0 else f"pruning_{i + 1}.png")
        plot_sweep(study["rows"], path, f"Pruning curve ({study.get('protocol', 'P2')})")
        written.append(path)
        sections.append(f"## Pruning curve: {study['_file']}\n\n{study.get('command', '')}\n")
    if results.skipped:
        sections.append(f"({len(results.skipped)} other JSON files skipped)\n")
    text = "\n".join(sections)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.md", text)
    return text, written
