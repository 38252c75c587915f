"""P2-val: pruning r=0.9 variants on one model (selection on held-out questions only)."""

import functools
import json
import sys
import time

import torch

import bivlm_plugin.integrations.transformers.pruning as tp
from bivlm_plugin.eval.vqa import PROTOCOLS, evaluate_vqa, load_vlm, p2_items
from bivlm_plugin.pruning import scores as S
from bivlm_plugin.utils import compute_dtype, torch_dtype

model_dir, out = sys.argv[1], sys.argv[2]
variants = sys.argv[3].split(",")
dtype = torch_dtype(compute_dtype("auto"))
model, proc = load_vlm(model_dir, dtype=dtype)
items = p2_items(None, PROTOCOLS["P2-val"])
state = {}


def vz_keep(scores, ratio, n_ctx):
    b, n = scores.shape
    k = S.keep_count(n, ratio)
    n_dom = k - n_ctx
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    dom = order[:, :n_dom]
    rest = order[:, n_dom:].sort(dim=1).values  # remaining, original order
    pick = torch.linspace(0, rest.shape[1] - 1, n_ctx).round().long()
    ctx = rest[:, pick]
    state["dom"], state["ctx"], state["rest"] = dom, ctx, rest
    return torch.cat([dom, ctx], 1).sort(dim=1).values


def vz_merge(feats, kept):
    b, n, d = feats.shape
    ctx, rest = state["ctx"], state["rest"]
    f = feats.float()
    unit = torch.nn.functional.normalize(f, dim=-1)
    rest_f = f.gather(1, rest[..., None].expand(-1, -1, d))
    rest_u = unit.gather(1, rest[..., None].expand(-1, -1, d))
    ctx_u = unit.gather(1, ctx[..., None].expand(-1, -1, d))
    tgt = (rest_u @ ctx_u.transpose(1, 2)).argmax(-1)
    c = ctx.shape[1]
    sums = f.new_zeros(b, c, d).scatter_add_(1, tgt[..., None].expand(-1, -1, d), rest_f)
    cnt = f.new_zeros(b, c).scatter_add_(1, tgt, f.new_ones(tgt.shape))
    ctx_out = sums / cnt.clamp_min(1)[..., None]
    outs = f.gather(1, kept[..., None].expand(-1, -1, d)).clone()
    # put contextual means at the kept positions that are context targets
    for bi in range(b):
        pos = {int(v): j for j, v in enumerate(kept[bi].tolist())}
        for j, v in enumerate(ctx[bi].tolist()):
            outs[bi, pos[v]] = ctx_out[bi, j]
    return outs.to(feats.dtype)


orig_keep, orig_merge = tp.keep_indices, tp.merge_pruned
results = {}
for v in variants:
    score, mode = v.split(":")
    merge = mode != "drop"
    if mode.startswith("vz"):
        n_ctx = int(mode[2:])
        tp.keep_indices = functools.partial(vz_keep, n_ctx=n_ctx)
        tp.merge_pruned = vz_merge
    else:
        tp.keep_indices, tp.merge_pruned = orig_keep, orig_merge
    gen = functools.partial(
        tp.generate_with_pruning, prune_ratio=0.9, prune_score=score, merge=merge
    )
    t = time.time()
    r = evaluate_vqa(model, proc, items, generate=gen, protocol=PROTOCOLS["P2-val"])
    results[v] = {"accuracy": r.accuracy, "by_kind": r.accuracy_by_kind, "n": r.n_questions}
    print(v, r.accuracy, r.accuracy_by_kind, f"{time.time() - t:.0f}s", flush=True)
    json.dump(
        {"model": model_dir, "protocol": "P2-val", "prune_ratio": 0.9, "results": results},
        open(out, "w"),
        indent=1,
    )
