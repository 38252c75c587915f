"""Layer-level study of shared column scales (``fold_scales``) on real SmolLM2 layers.

For decoder layer L, calibrates H of the attention input (q / k / v) and of the MLP input
(gate / up) on the first N P1 calibration windows (float32, FP model), then quantizes the
readers with the ~1-bit recipe's settings (1 ring, 1% salient, column code choice) under:

- ``none``: no column scale;
- ``stacked``: one scale from the readers' stacked rows, re-solved on the summed error;
- ``weighted``: what ``fold_scales`` does (the readers' own scales, geometric mean weighted
  by their relative error in a cheap pass; re-solved on the summed relative error);
- ``own``: a scale per layer (``col_scale``, which stores one fp16 per column).

Prints each reader's relative calibration error tr(R H R^T) / tr(W H W^T).

Usage: python scripts/fold_scale_study.py [--layers 0 15] [--windows 16]
"""

from __future__ import annotations

import argparse

import torch

from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.core.bivlm import BiVLMConfig, quantize_bivlm
from bivlm_plugin.core.colscale import initial_col_scale, solve_col_scale
from bivlm_plugin.core.refine import layer_error


def _ref(w: torch.Tensor, h: torch.Tensor) -> float:
    return layer_error(w, torch.zeros_like(w), h)


def _shared(ws, h, c, cfg, relative: bool) -> list[float]:
    qs = [dequantize(quantize_bivlm(w / c, h * c[None] * c[:, None], cfg).codes) for w in ws]
    norms = [_ref(w, h) ** 0.5 if relative else 1.0 for w in ws]
    c2 = solve_col_scale(
        [w / n for w, n in zip(ws, norms, strict=True)],
        [q / n for q, n in zip(qs, norms, strict=True)],
        [h] * len(ws),
        c,
        0.01,
    )
    return [layer_error(w, q * c2, h) / _ref(w, h) for w, q in zip(ws, qs, strict=True)]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bivlm_plugin.eval.data import p1_windows
    from bivlm_plugin.zoo import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    folder = build("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = p1_windows(tok, "calib")[: args.windows]
    cfg = BiVLMConfig(p_sal=0.01, n_rings=1, code_choice="column")
    cheap = BiVLMConfig(p_sal=0.01, n_rings=1, code_choice="block", refine_iters=0)
    print("| layer | readers | variant | relative error per reader | sum |")
    print("|---|---|---|---|---|")
    for li in args.layers:
        layer = model.model.layers[li]
        sums: dict[str, torch.Tensor] = {}

        def hook(key, sums=sums):
            def add(_m, a, _o):
                x = a[0].reshape(-1, a[0].shape[-1]).float()
                sums[key] = sums.get(key, 0) + 2 * x.T @ x

            return add

        handles = [
            layer.self_attn.q_proj.register_forward_hook(hook("attn")),
            layer.mlp.gate_proj.register_forward_hook(hook("mlp")),
        ]
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None])
        for handle in handles:
            handle.remove()
        n_tokens = windows.numel()
        groups = {
            "attn": [("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj),
                     ("v", layer.self_attn.v_proj)],
            "mlp": [("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj)],
        }  # fmt: skip
        for key, mods in groups.items():
            h = sums[key] / n_tokens
            names = [n for n, _ in mods]
            ws = [m.weight.data.float() for _, m in mods]
            e = torch.tensor(
                [
                    layer_error(w, dequantize(quantize_bivlm(w, h, cheap).codes), h) / _ref(w, h)
                    for w in ws
                ]
            )
            logs = torch.stack([initial_col_scale(w).log() for w in ws])
            weighted = ((e / e.sum()).unsqueeze(1) * logs).sum(0).exp()
            rows = {
                "none": [
                    layer_error(w, dequantize(quantize_bivlm(w, h, cfg).codes), h) / _ref(w, h)
                    for w in ws
                ],
                "stacked": _shared(ws, h, initial_col_scale(torch.cat(ws)), cfg, False),
                "weighted (fold_scales)": _shared(ws, h, weighted, cfg, True),
                "own (col_scale)": [
                    _shared([w], h, initial_col_scale(w), cfg, False)[0] for w in ws
                ],
            }
            for variant, errs in rows.items():
                per = ", ".join(f"{n} {x:.4f}" for n, x in zip(names, errs, strict=True))
                print(f"| {li} | {'/'.join(names)} | {variant} | {per} | {sum(errs):.4f} |")


if __name__ == "__main__":
    main()
