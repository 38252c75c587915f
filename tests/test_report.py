"""``bivlm report``: per-layer rows and part summaries by hand, plots from evaluation JSONs, the
pruning curve, and clear errors for paths that hold nothing to report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bivlm_plugin.app.report import (
    collect,
    layer_rows,
    method_points,
    part_summary,
    write_report,
)
from bivlm_plugin.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _layer(name, part, shape, bits, files, err, rel):
    return {
        "name": name,
        "part": part,
        "shape": shape,
        "method": "bivlm",
        "weight_bits": 1.0,
        "storage_bits": bits,
        "storage_bits_from_files": files,
        "error": err,
        "info": {"p_sal": 0.01, "n_rings": 2, "relative_error": rel},
    }


def _report(**extra):
    layers = [
        _layer("model.vision_tower.q", "vision", [64, 64], 2.0, 2.1, 1.0, 0.01),  # 4096 weights
        _layer("model.language_model.up", "language", [128, 64], 2.5, 2.6, 8.0, 0.20),  # 8192
        _layer("model.language_model.down", "language", [64, 128], 3.0, 3.1, 2.0, 0.05),  # 8192
    ]
    return {
        "method": "bivlm",
        "n_layers": 3,
        "weight_bits": 1.0,
        "storage_bits": 2.6,
        "storage_bits_from_files": 2.7,
        "layers": layers,
        **extra,
    }


def _write(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def results_dir(tmp_path) -> Path:
    """A quantized folder, P1 / P2 JSONs of it and of the FP model and a GPTQ peer, a pruned P2
    run, a pruning study and an unrelated JSON."""
    q = tmp_path / "ckpt"
    _write(q / "bivlm_report.json", _report())
    _write(q / "config.json", {"model_type": "llava"})  # skipped: another kind
    quant = {**_report(), "layers": _report()["layers"][:1]}
    gptq = {"method": "GPTQModifier", "weight_bits": 2.0, "storage_bits": 2.28}
    ev = tmp_path / "evals"
    _write(ev / "fp.p1.json", {"model": "/m/fp", "protocol": "P1", "ppl": 28.4})
    _write(ev / "fp.p2.json", {"model": "/m/fp", "protocol": "P2", "accuracy": 0.98})
    _write(
        ev / "w2.p1.json", {"model": "/m/w2", "protocol": "P1", "ppl": 250.0, "quantization": quant}
    )
    _write(
        ev / "w2.p2.json",
        {"model": "/m/w2", "protocol": "P2", "accuracy": 0.84, "quantization": quant},
    )
    _write(
        ev / "w2_pruned.p2.json",
        {
            "model": "/m/w2",
            "protocol": "P2",
            "accuracy": 0.71,
            "prune_ratio": 0.9,
            "prune_score": "cls_attention",
            "quantization": quant,
        },
    )
    _write(
        ev / "gptq.p2.json",
        {"model": "/m/g", "protocol": "P2", "accuracy": 0.05, "quantization": gptq},
    )
    rows = [
        {"model": m, "score": "feature_norm", "ratio": r, "accuracy": a}
        for m, pts in {"fp": [(0, 1.0), (0.9, 0.9)], "w2": [(0, 0.86), (0.9, 0.8)]}.items()
        for r, a in pts
    ]
    _write(
        tmp_path / "study" / "prune_study.json",
        {"protocol": "P2, first 200", "rows": rows, "command": "bivlm analyze pruning ..."},
    )
    return tmp_path


def test_layer_rows_and_part_summary_by_hand() -> None:
    rows = layer_rows(_report())
    assert [r["shape"] for r in rows] == ["64x64", "128x64", "64x128"]
    assert rows[1]["relative_error"] == 0.20 and rows[1]["n_rings"] == 2
    summary = {s["part"]: s for s in part_summary(rows)}
    assert set(summary) == {"vision", "language", "all"}
    lang, everything = summary["language"], summary["all"]
    assert lang["layers"] == 2 and lang["weights"] == 16384
    assert lang["storage_bits"] == pytest.approx(2.75)  # equal weights: (2.5 + 3.0) / 2
    assert lang["max_relative_error"] == 0.20
    # weight-averaged over 4096 + 8192 + 8192 weights
    assert everything["storage_bits"] == pytest.approx((2.0 * 1 + 2.5 * 2 + 3.0 * 2) / 5)
    assert everything["storage_bits_from_files"] == pytest.approx((2.1 + 2.6 * 2 + 3.1 * 2) / 5)
    assert everything["mean_relative_error"] == pytest.approx((0.01 + 0.20 + 0.05) / 3)


def test_a_report_without_parts_or_relative_errors() -> None:
    """A GPTQ-style report (no part, no info): one "all" row, errors shown as missing."""
    report = {"method": "GPTQModifier", "n_layers": 1, "layers": [{"name": "a", "shape": [4, 8]}]}
    rows = layer_rows(report)
    assert rows[0]["relative_error"] is None and rows[0]["method"] == "GPTQModifier"
    (s,) = part_summary(rows)
    assert s["part"] == "all" and s["weights"] == 32 and s["mean_relative_error"] is None


def test_collect_sorts_what_it_finds(results_dir) -> None:
    res = collect([results_dir])
    assert set(res.reports) == {"ckpt"}
    assert len(res.p1) == 2 and len(res.p2) == 4 and len(res.pruning) == 1
    assert [p.name for p in res.skipped] == ["config.json"]


def test_method_points_merge_p1_and_p2_per_folder(results_dir) -> None:
    points = {p["name"]: p for p in method_points(collect([results_dir / "evals"]))}
    assert set(points) == {
        "fp (unquantized)",
        "w2",
        "w2_pruned r=0.9 cls_attention",
        "gptq",
    }
    fp, w2 = points["fp (unquantized)"], points["w2"]
    assert (fp["storage_bits"], fp["p1"], fp["p2"], fp["method"]) == (16.0, 28.4, 0.98, "fp")
    assert (w2["storage_bits"], w2["p1"], w2["p2"]) == (2.7, 250.0, 0.84)  # bits from the files
    assert points["gptq"]["storage_bits"] == 2.28 and points["gptq"]["p1"] is None
    assert points["w2_pruned r=0.9 cls_attention"]["p2"] == 0.71


def test_write_report_prints_layers_and_writes_plots(results_dir, tmp_path) -> None:
    out = tmp_path / "out"
    text, written = write_report(collect([results_dir]), out, top=1)
    assert sorted(p.name for p in written) == ["p1_vs_bits.png", "p2_vs_bits.png", "pruning.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG
    assert (out / "report.md").read_text() == text
    assert "## ckpt: bivlm, 3 layers, 2.600 storage bits per weight (2.700 in the files)" in text
    # The worst layer by relative error comes first, alone (top=1).
    largest = text.split("Largest relative error (1 of 3):")[1].split("Every layer:")[0]
    assert "model.language_model.up" in largest and "model.vision_tower.q" not in largest
    assert "| model.language_model.down | language | 64x128 | 1.000 | 3.000 | 3.100 |" in text
    assert "| gptq | GPTQModifier | 2.000 | 2.280 | - | 0.0500 |" in text
    assert "1 other JSON files skipped" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries


def test_cli_report(results_dir, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["report", str(results_dir / "ckpt"), "--out-dir", str(out), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Largest relative error (2 of 3)" in printed and f"wrote {out / 'report.md'}" in printed
    assert not (out / "p1_vs_bits.png").exists()  # a checkpoint alone has no evaluations


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["report", "/nonexistent/x"], "/nonexistent/x: no such file or folder"),
        (["report", "EMPTY"], "nothing to report in"),
        (["report", "CONFIG"], "is not a quantization report, a P1 / P2 evaluation"),
        (["report", "BROKEN"], "not a readable JSON file"),
        (["report", "EMPTY", "--top", "0"], "--top 0: give at least 1"),
    ],
)
def test_cli_report_bad_input_names_it(argv, needle, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "config.json", {"model_type": "llama"})
    (tmp_path / "broken.json").write_text("{not json")
    subst = {
        "EMPTY": str(tmp_path / "empty"),
        "CONFIG": str(tmp_path / "config.json"),
        "BROKEN": str(tmp_path / "broken.json"),
    }
    argv = [subst.get(a, a) for a in argv]
    assert main([*argv, "--out-dir", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on error


def test_the_same_name_in_two_result_folders_stays_two_points(results_dir) -> None:
    """A folder re-quantized and evaluated again into another result folder is another point."""
    quant = {"method": "bivlm", "weight_bits": 1.0, "storage_bits": 2.23}
    _write(
        results_dir / "older" / "w2.p2.json",
        {"model": "/m/w2", "protocol": "P2", "accuracy": 0.42, "quantization": quant},
    )
    points = method_points(collect([results_dir / "evals", results_dir / "older"]))
    acc = {p["name"]: p["p2"] for p in points if p["name"].startswith("w2 ")}
    assert acc == {"w2 [evals]": 0.84, "w2 [older]": 0.42}


def test_p1_plot_draws_one_curve_per_method_through_its_best_runs(tmp_path, monkeypatch) -> None:
    from bivlm_plugin.app import report as rep

    figs = []
    monkeypatch.setattr(rep, "save_figure", lambda fig, path: figs.append(fig))
    pts = [
        {"name": "a", "method": "bivlm", "storage_bits": 1.271, "p1": 2306.0},
        {"name": "b", "method": "bivlm", "storage_bits": 1.271, "p1": 1116.0},  # same budget
        {"name": "d", "method": "bivlm", "storage_bits": 1.269, "p1": 3668.0},  # same budget
        {"name": "c", "method": "bivlm", "storage_bits": 2.22, "p1": 113.8},
        {"name": "g", "method": "GPTQModifier", "storage_bits": 3.25, "p1": 78.8},  # one run
    ]
    assert rep.plot_metric_vs_bits(pts, "p1", tmp_path / "p1.png")
    (ax,) = figs[0].axes
    (line,) = ax.lines  # the single-run method has no curve
    assert list(line.get_xdata()) == [1.271, 2.22] and list(line.get_ydata()) == [1116.0, 113.8]
