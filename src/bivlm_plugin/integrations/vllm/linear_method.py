"""``BiVLMLinearMethod``: vLLM linear layers kept packed, run through ``bivlm::binary_linear``.

``create_weights`` registers one parameter per tensor of the rank-local layout (``signs``,
``rings``, ``scales``, ``mean``, ``salient_*``), named as in the checkpoint so vLLM's loaders
route ``<module>.<tensor>`` to them, with shapes from ``loading.RankPlan``:

- column-parallel layers (``ColumnParallelLinear``, ``MergedColumnParallelLinear`` (gate/up),
  ``QKVParallelLinear``) take each part's rows for this rank (k / v of replicated KV heads: the
  rows of ``tp_rank // num_kv_head_replicas``), then fuse the parts along rows;
- ``RowParallelLinear`` takes this rank's input columns (32-column word boundaries, salient
  indices remapped, ``salient_count``); vLLM adds the bias on rank 0 only;
- ``ReplicatedLinear`` takes everything.

The weight loader collects each part's stored tensors (the shard id, ``"q"``/``"k"``/``"v"`` or
0/1, comes as an argument or as vLLM's ``loaded_weight.shard_id``); once every tensor of every
part has arrived, ``loading.assemble`` slices and fuses them and the result is copied into the
parameters. ``process_weights_after_loading`` fails, naming what is missing, if a part never
arrived.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from bivlm_plugin.format.checkpoint import layout_from_header
from bivlm_plugin.format.codes import dequantize_packed
from bivlm_plugin.format.layout import BivlmLayout

from .loading import RankPlan, assemble, column_parallel_plan, row_parallel_plan

__all__ = ["BiVLMLinearMethod", "packed_layers", "plan_for_layer"]

logger = logging.getLogger(__name__)

_QKV_IDS = {"q": 0, "k": 1, "v": 2}


def plan_for_layer(
    layer: torch.nn.Module,
    layouts: list[BivlmLayout],
    input_size_per_partition: int,
    output_partition_sizes: list[int],
) -> RankPlan:
    """The rank-local plan of a vLLM linear layer given its parts' stored layouts."""
    tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    if isinstance(layer, RowParallelLinear):
        (layout,) = layouts
        start = tp_rank * input_size_per_partition
        return row_parallel_plan(layout, start, start + input_size_per_partition)
    if isinstance(layer, ReplicatedLinear) or tp_size == 1:
        return column_parallel_plan(layouts, output_partition_sizes, [0] * len(layouts))
    ranks = [tp_rank] * len(layouts)
    if isinstance(layer, QKVParallelLinear):
        replicas = getattr(layer, "num_kv_head_replicas", 1)
        ranks = [tp_rank] + [tp_rank // replicas] * (len(layouts) - 1)
    return column_parallel_plan(layouts, output_partition_sizes, ranks)


class _PartCollector:
    """Gathers the stored tensors of each part of one layer, then fills its parameters."""

    def __init__(self, layer: torch.nn.Module, prefix: str, plan: RankPlan) -> None:
        self.layer = layer
        self.prefix = prefix
        self.plan = plan
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in plan.parts]
        self.done = False

    def part_index(self, shard_id: Any) -> int:
        n = len(self.plan.parts)
        if shard_id is None:
            if n != 1:
                raise ValueError(
                    f"{self.prefix}: the checkpoint stores this fused layer as one module; "
                    "bivlm-binary checkpoints store fused siblings (q/k/v, gate/up) separately"
                )
            return 0
        idx = _QKV_IDS.get(shard_id, shard_id) if isinstance(shard_id, str) else int(shard_id)
        if not 0 <= idx < n:
            raise ValueError(f"{self.prefix}: shard id {shard_id!r} outside its {n} parts")
        return idx

    def load(self, param: Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:
            shard_id = getattr(loaded_weight, "shard_id", None)
        i = self.part_index(shard_id)
        name = param.bivlm_tensor
        expected = self.plan.parts[i].layout.specs()
        if name not in expected:
            raise ValueError(
                f"{self.prefix} part {i}: the checkpoint holds {name!r}, which its stored layout "
                f"{self.plan.parts[i].layout} has no tensor for"
            )
        self.pending[i][name] = loaded_weight.detach().to("cpu", copy=True)
        if all(
            set(p) == set(part.layout.specs())
            for p, part in zip(self.pending, self.plan.parts, strict=True)
        ):
            self._fill()

    def _fill(self) -> None:
        packed = assemble(self.plan, self.pending)
        for name, t in packed.items():
            param = getattr(self.layer, name)
            param.data.copy_(t)
        self.pending = []
        self.done = True

    def missing(self) -> list[str]:
        return [
            f"part {i}.{t}"
            for i, (p, part) in enumerate(zip(self.pending, self.plan.parts, strict=True))
            for t in part.layout.specs()
            if t not in p
        ]


class BiVLMLinearMethod(LinearMethodBase):
    """Packed Bi-VLM linear for vLLM (CPU, CUDA through the kernel chooser).

    Args:
        quant_config: the ``BiVLMVllmConfig``.
        prefix: the layer's module name (vLLM's, e.g. ``model.layers.0.self_attn.qkv_proj``).
    """

    def __init__(self, quant_config: Any, prefix: str) -> None:
        self.quant_config = quant_config
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        cfg = self.quant_config
        layouts = [
            layout_from_header(cfg.stored_entries(name), input_size, name)
            for name in cfg.part_names(self.prefix)
        ]
        try:
            plan = plan_for_layer(layer, layouts, input_size_per_partition, output_partition_sizes)
        except ValueError as e:
            tp = getattr(layer, "tp_size", 1)
            raise ValueError(f"{self.prefix} (tensor_parallel_size={tp}): {e}") from e
        layout = plan.layout
        if layout.shape != (sum(output_partition_sizes), input_size_per_partition):
            raise ValueError(
                f"{self.prefix}: rank-local packed layout {layout.shape} does not match the "
                f"layer's ({sum(output_partition_sizes)}, {input_size_per_partition})"
            )
        collector = _PartCollector(layer, self.prefix, plan)
        for name, spec in layout.specs().items():
            param = Parameter(torch.zeros(spec.shape, dtype=spec.dtype), requires_grad=False)
            param.bivlm_tensor = name
            param.weight_loader = collector.load
            layer.register_parameter(name, param)
        layer.bivlm_layout = layout
        layer.bivlm_collector = collector

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        collector = getattr(layer, "bivlm_collector", None)
        if collector is None:
            return
        if not collector.done:
            raise ValueError(
                f"{self.prefix}: packed tensors never loaded: {collector.missing()}; the "
                "checkpoint is incomplete"
            )
        del layer.bivlm_collector
        # Weights are fixed from here: on CPU the layer keeps the kernel's prepared layer (one
        # tensor argument per call instead of eleven, no per-call dict, layout or chooser: at
        # SmolLM2's shapes that Python cost as much as the kernel) and its handle for the
        # bivlm_cpu::packed_linear op, which torch.compile'd graphs call.
        layer.__dict__.pop("_bivlm_fast", None)
        layer.__dict__.pop("_bivlm_handle", None)
        if layer.signs.device.type == "cpu":
            from bivlm_plugin.kernels.cpu import CpuKernel

            fast = CpuKernel.prepare(self._packed(layer), layer.bivlm_layout)
            if fast is not None:
                handle = CpuKernel.register(fast)
                weakref.finalize(layer, CpuKernel.release, handle)
                layer.__dict__["_bivlm_fast"] = fast
                layer.__dict__["_bivlm_handle"] = handle

    def _packed(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: getattr(layer, name) for name in layer.bivlm_layout.specs()}

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        fast = layer.__dict__.get("_bivlm_fast")
        if fast is not None:
            if not torch.compiler.is_compiling():
                y = fast(x, bias)  # decode-sized inputs: the GEMV kernel, no dispatcher
                if y is not None:
                    return y
            # Prefill (dequantize once, one GEMM) and compiled graphs: the C++ op, no Python.
            return torch.ops.bivlm_cpu.packed_linear(x, layer._bivlm_handle, bias)
        from bivlm_plugin.kernels.ops import binary_linear

        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return binary_linear(x, self._packed(layer), layer.bivlm_layout, bias)

    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """Dense (O, I) float32 weight of the rank-local layer (for re-quantization)."""
        return dequantize_packed(self._packed(layer), layer.bivlm_layout)


def packed_layers(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``module name -> {"layout", "params", "bytes"}`` of every packed layer of a vLLM model.

    Meant for ``LLM.apply_model(packed_layers)`` (importable, so it pickles by reference into
    vLLM's workers): shows which layers run packed, their rank-local layouts, and that they hold
    no dense ``weight``.
    """
    out = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "quant_method", None), BiVLMLinearMethod):
            params = dict(mod.named_parameters(recurse=False))
            out[name] = {
                "layout": repr(mod.bivlm_layout),
                "params": sorted(params),
                "bytes": sum(
                    p.numel() * p.element_size() for n, p in params.items() if n != "bias"
                ),
            }
    return out
