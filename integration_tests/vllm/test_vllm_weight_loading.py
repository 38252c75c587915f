"""vLLM integration without an engine: registration, the override, fused / TP-sharded loading.

Tensor parallelism is simulated: layers are built with ``tp_rank`` / ``tp_size`` set by hand and
loaded through the method's weight loaders, and each rank's packed tensors are checked against
the dense weight dequantized-then-sliced (exact: both paths decode the same fp16 numbers).
"""

from __future__ import annotations

import importlib.metadata
import pickle
import random

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from bivlm_plugin.format.codes import dequantize_packed, layout_of, pack  # noqa: E402
from bivlm_plugin.format.synthetic import random_codes  # noqa: E402
from bivlm_plugin.integrations.vllm import register  # noqa: E402
from bivlm_plugin.integrations.vllm.config import BiVLMVllmConfig  # noqa: E402
from bivlm_plugin.integrations.vllm.linear_method import (  # noqa: E402
    BiVLMLinearMethod,
    packed_layers,
)
from bivlm_plugin.integrations.vllm.loading import (  # noqa: E402
    assemble,
    column_parallel_plan,
    row_parallel_plan,
)
from bivlm_plugin.kernels.ops import binary_linear  # noqa: E402

PREFIX = "model.layers.0"


def _bivlm_cfg(targets: list[str]) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "bivlm-binary",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"format": "bivlm-binary", "targets": targets}},
        "ignore": ["lm_head"],
    }


# ------------------------------------------------------------------ registration / override
def test_register_is_idempotent_and_entry_point_targets_it() -> None:
    from vllm.model_executor.layers import quantization as vq

    register()
    register()
    assert vq.get_quantization_config("bivlm") is BiVLMVllmConfig
    assert vq.QUANTIZATION_METHODS.count("bivlm") == 1
    (ep,) = [
        e
        for e in importlib.metadata.entry_points(group="vllm.general_plugins")
        if e.name == "bivlm"
    ]
    assert ep.load() is register


def test_override_claims_bivlm_and_declines_plain_compressed_tensors() -> None:
    bivlm = _bivlm_cfg([f"{PREFIX}.mlp.down_proj"])
    plain = {**bivlm, "format": "pack-quantized"}
    plain["config_groups"] = {"group_0": {"format": "pack-quantized", "targets": ["Linear"]}}
    over = BiVLMVllmConfig.override_quantization_method
    assert over(bivlm, None) == "bivlm"
    assert over(bivlm, "bivlm") == "bivlm"
    assert over(bivlm, "compressed-tensors") == "bivlm"
    assert over(bivlm, "fp8") is None  # vLLM then reports the user / checkpoint mismatch
    assert over(plain, None) is None
    assert over(plain, "compressed-tensors") is None
    assert over({"quant_method": "gptq", "bits": 4}, None) is None
    with pytest.raises(ValueError, match="not a packed Bi-VLM checkpoint"):
        BiVLMVllmConfig.from_config(plain)


def test_vllm_resolution_order_reaches_our_override_first() -> None:
    """vLLM's own walk (config/model.py ``_verify_quantization``) picks bivlm, not c-t."""
    from vllm.model_executor.layers import quantization as vq

    register()
    bivlm = _bivlm_cfg([f"{PREFIX}.mlp.down_proj"])
    for name in vq.QUANTIZATION_METHODS:
        got = vq.get_quantization_config(name).override_quantization_method(bivlm, None)
        if got is not None:
            assert got == "bivlm", f"{name} claims the bivlm checkpoint as {got}"
            break
    else:
        pytest.fail("no quantization config claimed the bivlm-binary checkpoint")


# --------------------------------------------------------------------- pure loading math
def _part(o: int, i: int, n: int, k: int, sm: str = "row_ring", mm: str = "row", seed: int = 0):
    codes = random_codes(o, i, n, k, sm, mm, seed=seed)
    packed, layout = pack(codes), layout_of(codes)
    return packed, layout, dequantize_packed(packed, layout)


QKV_PARTS = [  # (O, n_rings, k, scale_mode, mean_mode): unequal k, mixed ring / row modes
    (64, 2, 3, "ring", "row"),
    (32, 2, 1, "row_ring", "row_subset"),
    (32, 2, 0, "row_ring", "row"),
]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_fused_rank_tensors_equal_dense_slices(tp: int) -> None:
    parts = [_part(o, 96, n, k, sm, mm, seed=s) for s, (o, n, k, sm, mm) in enumerate(QKV_PARTS)]
    for rank in range(tp):
        plan = column_parallel_plan(
            [p[1] for p in parts], [p[1].out_features // tp for p in parts], [rank] * 3
        )
        got = dequantize_packed(assemble(plan, [p[0] for p in parts]), plan.layout)
        want = torch.cat(
            [d[rank * (d.shape[0] // tp) : (rank + 1) * (d.shape[0] // tp)] for _, _, d in parts]
        )
        assert torch.equal(got, want), (tp, rank)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("n_rings,k", [(1, 0), (2, 5), (4, 40)])
def test_row_parallel_partial_outputs_sum_to_full(tp: int, n_rings: int, k: int) -> None:
    i = 384  # 192 / 96 columns per rank at tp 2 / 4: word aligned, not a power of two
    packed, layout, dense = _part(37, i, n_rings, k, seed=7)
    x = torch.randn(3, i, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(3, 37)
    for rank in range(tp):
        start, end = rank * i // tp, (rank + 1) * i // tp
        plan = row_parallel_plan(layout, start, end)
        local = assemble(plan, [packed])
        assert torch.equal(dequantize_packed(local, plan.layout), dense[:, start:end])
        total += binary_linear(x[:, start:end], local, plan.layout)
    torch.testing.assert_close(total, x @ dense.T, rtol=1e-5, atol=1e-5)


def test_row_parallel_rejects_shards_off_word_boundaries() -> None:
    _, layout, _ = _part(8, 96, 1, 2)
    with pytest.raises(ValueError, match="word boundaries"):
        row_parallel_plan(layout, 48, 96)


# ------------------------------------------------------- through the vLLM method's loaders
def _fake_layer(cls, tp_rank: int, tp_size: int, **attrs) -> nn.Module:
    """A vLLM linear class instance without distributed init (only what the method reads)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.tp_rank, layer.tp_size = tp_rank, tp_size
    for k, v in attrs.items():
        setattr(layer, k, v)
    return layer


@pytest.fixture
def checkpoint(tmp_path):
    """A folder holding packed q/k/v, gate/up, o and down projections of one layer."""
    hidden, inter = 128, 192
    mods = {
        "self_attn.q_proj": _part(hidden, hidden, 2, 3, "ring", "row", seed=1),
        "self_attn.k_proj": _part(32, hidden, 2, 1, "row_ring", "row_subset", seed=2),
        "self_attn.v_proj": _part(32, hidden, 2, 0, seed=3),
        "self_attn.o_proj": _part(hidden, hidden, 2, 4, seed=4),
        "mlp.gate_proj": _part(inter, hidden, 2, 2, seed=5),
        "mlp.up_proj": _part(inter, hidden, 2, 2, "ring", seed=6),
        "mlp.down_proj": _part(hidden, inter, 2, 6, seed=7),
    }
    tensors = {
        f"{PREFIX}.{m}.{t}": v.contiguous() for m, (p, _, _) in mods.items() for t, v in p.items()
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = BiVLMVllmConfig.from_config(_bivlm_cfg([f"{PREFIX}.{m}" for m in mods]))
    cfg.maybe_update_config(str(tmp_path))
    cfg.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return cfg, mods, tensors


def _load(layer, method, tensors, prefix, parts: dict, seed: int) -> None:
    """Feed the layer's tensors in a shuffled order, as vLLM's loader would (shard ids on the
    tensor for fused parts, as ``WeightsMapper`` sets them)."""
    items = []
    for part_name, shard_id in parts.items():
        for key, t in tensors.items():
            if key.startswith(f"{prefix}.{part_name}."):
                items.append((key.rsplit(".", 1)[1], t, shard_id))
    random.Random(seed).shuffle(items)
    for name, t, shard_id in items:
        t = t.clone()
        if shard_id is not None:
            t.shard_id = shard_id
        param = getattr(layer, name)
        param.weight_loader(param, t)
    method.process_weights_after_loading(layer)


def _build(cfg, layer, vllm_prefix, in_part, out_parts, in_full, out_full):
    method = cfg.get_quant_method(layer, vllm_prefix)
    assert isinstance(method, BiVLMLinearMethod)
    method.create_weights(layer, in_part, out_parts, in_full, out_full, torch.float32)
    return method


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_parallel_loading_with_kv_replication(checkpoint, tp: int) -> None:
    cfg, mods, tensors = checkpoint
    head, n_heads, n_kv = 32, 4, 1  # tp 2 / 4 replicate the single KV head
    replicas = max(1, tp // n_kv)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    deq = {m: mods[f"self_attn.{m}"][2] for m in ("q_proj", "k_proj", "v_proj")}
    for rank in range(tp):
        layer = _fake_layer(QKVParallelLinear, rank, tp, num_kv_head_replicas=replicas)
        q_rows = n_heads * head // tp
        method = _build(
            cfg, layer, f"{PREFIX}.self_attn.qkv_proj", 128, [q_rows, head, head], 128, 192
        )
        parts = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
        _load(layer, method, tensors, f"{PREFIX}.self_attn", parts, seed=rank)
        kv = rank // replicas
        want = torch.cat(
            [
                deq["q_proj"][rank * q_rows : (rank + 1) * q_rows],
                deq["k_proj"][kv * head :][:head],
                deq["v_proj"][kv * head :][:head],
            ]
        )
        torch.testing.assert_close(method.apply(layer, x), x @ want.T, rtol=1e-5, atol=1e-5)
        assert torch.equal(method.dequantize_weight(layer), want)


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_gate_up_and_row_parallel_down(checkpoint, tp: int) -> None:
    cfg, mods, tensors = checkpoint
    inter = 192
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    h = torch.randn(4, inter, generator=torch.Generator().manual_seed(2))
    gate, up, down = (mods[f"mlp.{m}"][2] for m in ("gate_proj", "up_proj", "down_proj"))
    down_total = torch.zeros(4, 128)
    for rank in range(tp):
        rows = inter // tp
        layer = _fake_layer(MergedColumnParallelLinear, rank, tp)
        method = _build(cfg, layer, f"{PREFIX}.mlp.gate_up_proj", 128, [rows, rows], 128, 2 * inter)
        _load(layer, method, tensors, f"{PREFIX}.mlp", {"gate_proj": 0, "up_proj": 1}, seed=rank)
        sl = slice(rank * rows, (rank + 1) * rows)
        want = torch.cat([gate[sl], up[sl]])
        torch.testing.assert_close(method.apply(layer, x), x @ want.T, rtol=1e-5, atol=1e-5)

        cols = inter // tp
        layer = _fake_layer(RowParallelLinear, rank, tp)
        method = _build(cfg, layer, f"{PREFIX}.mlp.down_proj", cols, [128], inter, 128)
        _load(layer, method, tensors, f"{PREFIX}.mlp", {"down_proj": None}, seed=rank)
        down_total += method.apply(layer, h[:, rank * cols : (rank + 1) * cols])
        layer.quant_method = method
        (info,) = packed_layers(nn.ModuleDict({"down_proj": layer})).values()
        assert "weight" not in info["params"] and info["bytes"] > 0
        assert pickle.loads(pickle.dumps(packed_layers)) is packed_layers  # for apply_model
    torch.testing.assert_close(down_total, h @ down.T, rtol=1e-5, atol=1e-5)


def test_unfinished_loading_and_untargeted_layers(checkpoint) -> None:
    cfg, _, tensors = checkpoint
    layer = _fake_layer(ColumnParallelLinear, 0, 1)
    assert isinstance(cfg.get_quant_method(layer, "lm_head_like"), UnquantizedLinearMethod)
    assert cfg.get_quant_method(nn.Embedding(4, 4), "model.embed_tokens") is None
    layer = _fake_layer(ReplicatedLinear, 0, 1)
    method = _build(cfg, layer, f"{PREFIX}.self_attn.o_proj", 128, [128], 128, 128)
    sign_key = f"{PREFIX}.self_attn.o_proj.signs"
    layer.signs.weight_loader(layer.signs, tensors[sign_key])
    with pytest.raises(ValueError, match="never loaded"):
        method.process_weights_after_loading(layer)


def test_partly_targeted_fused_layer_is_refused(checkpoint) -> None:
    cfg, _, _ = checkpoint
    # Neither named in the config nor stored packed in the files (the files are ground truth).
    cfg.targets.discard(f"{PREFIX}.self_attn.v_proj")
    cfg._load_stored().pop(f"{PREFIX}.self_attn.v_proj")
    layer = _fake_layer(QKVParallelLinear, 0, 1, num_kv_head_replicas=1)
    with pytest.raises(ValueError, match="fused siblings"):
        cfg.get_quant_method(layer, f"{PREFIX}.self_attn.qkv_proj")
