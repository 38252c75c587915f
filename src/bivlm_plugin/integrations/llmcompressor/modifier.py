"""``BiVLMModifier``: Bi-VLM (and its baselines) as an llm-compressor modifier.

Lifecycle (llm-compressor's sequential pipeline, so each layer is calibrated on the outputs of the
layers already quantized):

- ``on_initialize``: resolve targets into language / vision modules; fail when nothing matches.
- ``on_calibration_start``: a forward hook per target accumulates H = 2 X^T X / n.
- ``on_sequential_epoch_end``: quantize the modules of the finished subgraph with the chosen
  method from ``bivlm_plugin.core`` and write the dequantized weight back (fake quantization,
  until the packed format takes over), keeping each layer's codes and bit count.
- ``on_calibration_end``: remove hooks.

The math lives in ``bivlm_plugin.core``; this file is lifecycle, matching and bookkeeping only.

Example recipe::

    quant_stage:
      quant_modifiers:
        BiVLMModifier:
          method: bivlm
          p_sal: 0.01
          n_rings: 1
          targets: [Linear]
          ignore: [lm_head]
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from pydantic import Field, PrivateAttr, field_validator, model_validator

from bivlm_plugin.core import methods
from bivlm_plugin.core.allocate import BitLedger
from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.core.bits import ring_index_bits
from bivlm_plugin.core.bivlm import LayerCandidates, bivlm_candidates
from bivlm_plugin.core.hessian import HessianAccumulator
from bivlm_plugin.core.types import QuantResult, get_method
from bivlm_plugin.integrations.llmcompressor.fold import FoldGroup, resolve_fold_groups

__all__ = ["BiVLMModifier", "LayerRecord", "register_modifiers"]

logger = logging.getLogger(__name__)

methods.load_all()  # Bi-VLM and the baselines register themselves with the core registry

# Module-name patterns of the vision encoder and of the projector in the supported VLM families
# (Qwen2-VL / Qwen2.5-VL: visual.*, visual.merger; LLaVA: vision_tower, multi_modal_projector;
# Idefics3 / SmolVLM: vision_model, connector).
DEFAULT_VISION = ["re:(^|.*\\.)(visual|vision_tower|vision_model|vision_encoder)\\..*"]
DEFAULT_PROJECTOR = ["re:.*(multi_modal_projector|visual\\.merger|connector|mm_projector).*"]
NEVER = ["re:(^|.*\\.)lm_head$", "re:.*embed_tokens$", "re:.*(norm|layernorm)[^.]*$"]


# Modifier fields shared by the methods -> the core config field they set (p_sal for language
# modules, p_sal_vision for vision modules, both into the core's p_sal).
_SHARED_KNOBS = {
    "p_sal": "p_sal",
    "p_sal_vision": "p_sal",
    "n_rings": "n_rings",
    "stats": "stats",
    "scale_mode": "scale_mode",
    "mean_mode": "mean_mode",
    "salient_select": "salient_select",
    "salient_metric": "salient_metric",
    "assign": "assign",
    "refine_iters": "refine_iters",
    "refine_weighted": "refine_weighted",
    "refit_iters": "refit_iters",
    "compensate": "compensate",
    "code_choice": "code_choice",
    "act_order": "act_order",
    "col_scale": "col_scale",
    "block_size": "block_size",
    "dampening_frac": "percdamp",
    "p_sal_candidates": "p_sal_candidates",
    "p_sal_candidates_vision": "p_sal_candidates",
    "bit_budget": "bit_budget",
    "candidate_search": "candidate_search",
}
_LANGUAGE_KNOBS = {"p_sal", "p_sal_candidates"}
_VISION_KNOBS = {"p_sal_vision", "p_sal_candidates_vision"}
_PART_KNOBS = _LANGUAGE_KNOBS | _VISION_KNOBS


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What the modifier did to one module (for reports and the packed format)."""

    name: str
    part: str  # "language" or "vision"
    shape: tuple[int, int]
    method: str
    weight_bits: float
    storage_bits: float
    error: float | None
    seconds: float
    info: dict[str, Any]


class BiVLMModifier(Modifier):
    """Ultra-low-bit (<= 2 bits) post-training quantization with Bi-VLM or a baseline.

    Args:
        method: ``bivlm`` (default) or a baseline registered in ``bivlm_plugin.core``
            (``billm``, ``arb_x``, ``arb_rc``, ``rtn_sign``): one recipe line switches method.
        p_sal: salient share for language-model linears (paper hint ~1%).
        p_sal_vision: salient share for vision-encoder linears (paper hint ~5%).
        n_rings: inlier rings (their ring index costs ceil(log2 N) bits per weight).
        stats / scale_mode / mean_mode / salient_select / salient_metric / assign: see
            ``bivlm_plugin.core.bivlm.BiVLMConfig``.
        refine_iters / refine_weighted / refit_iters: ARB-style alternating refinement.
        compensate / block_size / dampening_frac: GPTQ block-wise error compensation.
        code_choice: ``block`` (codes of a block picked at once) or ``column`` (GPTQ proper:
            each column re-picked after the updates of the columns before it).
        act_order: compensate the columns in decreasing order of the Hessian diagonal (GPTQ's
            activation ordering); the codes and the packed format are unchanged.
        col_scale: also store one fp16 scale per input column (``BiVLMConfig.col_scale``);
            such layers are saved fake-quantized (not in the packed format yet).
        fold_scales: per-input-column scales at zero bits: one scale vector shared by the
            linears that read the same input (q / k / v, gate / up, down), folded into the
            norm or linear that produces it (``integrations.llmcompressor.fold``; which
            layers feed which is llm-compressor's AWQ mapping table). Packs and serves as is.
            Bi-VLM only; needs ``scale_mode: row_ring``; not with ``col_scale``.
        p_sal_candidates / bit_budget: per-layer salient share of language-model linears chosen
            by tr(R H R^T) under a storage-bit budget (a cap per layer, or with
            ``allocation: model`` the average over every quantized weight).
        candidate_search: how a layer's shares within ``bit_budget`` are compared: ``full``
            (each quantized in full, least final error), ``encoded`` or ``refined`` (compared on
            the error of their closed-form or once-refined codes; only the winner is compensated:
            one compensation per layer). ``BiVLMConfig.candidate_search``. With
            ``allocation: model`` the ledger then trades those proxy errors against bits and
            only the chosen candidate of each layer is finished.
        n_rings_candidates: inlier ring counts to choose from per layer (Bi-VLM only), with
            the salient shares; None keeps ``n_rings`` for every layer.
        allocation: ``layer`` (each layer takes its least-error candidate within
            ``bit_budget``) or ``model`` (``bit_budget`` is the model-wide average: each
            sequential group, a decoder layer at a time, spends the budget left per weight left
            on the candidates whose calibration error falls most per bit;
            ``core.allocate``). Bi-VLM only.
        allocation_error: the error the model-wide ledger trades against bits: ``relative``
            (tr(R H R^T) / tr(W H W^T), each layer's share of its own output lost) or
            ``absolute`` (tr(R H R^T), the squared output error per calibration token, which
            weighs a layer by the size of what it writes). Only with ``allocation: model``.
        p_sal_candidates_vision: the same search for vision-encoder linears (under the same
            bit_budget); by default they take ``p_sal_vision``, outside the budget (the vision
            encoder is a few percent of a VLM's weights; the report counts its bits).
        method_args: extra config fields for the chosen method (baselines' own knobs).
        scope: ``language`` (paper setting 1) or ``all`` (whole VLM, vision encoder too).
        targets: module classes / names to quantize (compressed-tensors matching, ``re:``).
        ignore: modules never quantized, on top of embeddings, lm_head, norms and projector.
        vision_patterns / projector_patterns: how vision-encoder and projector modules are found.
        quantize_projector: quantize the projector too (kept in higher precision by default).
    """

    requires_calibration_data: bool = True

    method: str = "bivlm"
    p_sal: float = Field(default=0.01, ge=0.0, lt=0.5)
    p_sal_vision: float = Field(default=0.05, ge=0.0, lt=0.5)
    n_rings: int = Field(default=1, ge=1, le=256)
    stats: Literal["row", "layer"] = "row"
    scale_mode: Literal["row_ring", "ring"] = "row_ring"
    mean_mode: Literal["row", "row_subset"] = "row"
    salient_select: Literal["topk", "threshold"] = "topk"
    salient_metric: Literal["hessian", "magnitude"] = "hessian"
    assign: Literal["nearest", "threshold"] = "nearest"
    refine_iters: int = Field(default=3, ge=0)
    refine_weighted: bool = True
    refit_iters: int = Field(default=2, ge=0)
    compensate: bool = True
    code_choice: Literal["block", "column"] = "block"
    act_order: bool = False
    col_scale: bool = False
    fold_scales: bool = False
    block_size: int = Field(default=128, gt=0)
    dampening_frac: float = Field(default=0.01, ge=0.0, lt=1.0)
    p_sal_candidates: list[float] | None = None
    p_sal_candidates_vision: list[float] | None = None
    bit_budget: float | None = Field(default=None, gt=0.0)
    candidate_search: Literal["full", "encoded", "refined"] = "full"
    n_rings_candidates: list[int] | None = None
    allocation: Literal["layer", "model"] = "layer"
    allocation_error: Literal["relative", "absolute"] = "relative"
    method_args: dict[str, Any] = Field(default_factory=dict)

    scope: Literal["language", "all"] = "language"
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    vision_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_VISION))
    projector_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_PROJECTOR))
    quantize_projector: bool = False

    _modules: dict[torch.nn.Module, tuple[str, str]] = PrivateAttr(default_factory=dict)
    _hessians: dict[torch.nn.Module, HessianAccumulator] = PrivateAttr(default_factory=dict)
    _records: list[LayerRecord] = PrivateAttr(default_factory=list)
    _codes: dict[str, Any] = PrivateAttr(default_factory=dict)
    _ledger: BitLedger | None = PrivateAttr(default=None)
    _fold_groups: list[FoldGroup] = PrivateAttr(default_factory=list)
    _folded: set[int] = PrivateAttr(default_factory=set)
    _fold_seconds: float = PrivateAttr(default=0.0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # raises ValueError listing the available methods
        return value

    @field_validator("targets")
    @classmethod
    def _nonempty_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("targets is empty; use e.g. targets: [Linear]")
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> BiVLMModifier:
        """Every field a recipe sets is used or rejected here, at construction, naming it."""
        own = sorted(
            {"n_rings_candidates", "allocation", "allocation_error", "fold_scales"}
            & self.model_fields_set
        )
        if self.method != "bivlm" and own:
            raise ValueError(
                f"recipe field(s) {own} are used by method 'bivlm' only, not {self.method!r}; "
                "remove them"
            )
        if self.fold_scales and self.col_scale:
            raise ValueError(
                "fold_scales and col_scale both add column scales; choose one (fold_scales: "
                "shared scales folded into the previous layer, 0 bits; col_scale: one fp16 per "
                "column stored with each layer)"
            )
        if self.fold_scales and self.scale_mode != "row_ring":
            raise ValueError(
                f"fold_scales needs scale_mode: row_ring (a folded scale rescales the rows of "
                f"a quantized linear such as up_proj), got scale_mode: {self.scale_mode}"
            )
        rings = [self.n_rings]
        if self.n_rings_candidates is not None:
            rings = list(self.n_rings_candidates)
            bad = [r for r in rings if isinstance(r, bool) or not 1 <= r <= 256]
            if not rings or bad:
                raise ValueError(
                    f"n_rings_candidates {self.n_rings_candidates} must be a non-empty list of "
                    "ring counts in [1, 256], e.g. [1, 2]"
                )
        if "allocation_error" in self.model_fields_set and self.allocation != "model":
            raise ValueError(
                f"allocation_error: {self.allocation_error} is read by allocation: model only "
                f"(allocation is {self.allocation!r}); set allocation: model or remove it"
            )
        if self.allocation == "model":
            if self.bit_budget is None:
                raise ValueError(
                    "allocation: model needs bit_budget (the average storage bits per weight "
                    "over every quantized weight), e.g. bit_budget: 1.3"
                )
            if self.p_sal_candidates is None and self.n_rings_candidates is None:
                raise ValueError(
                    "allocation: model has nothing to allocate: set p_sal_candidates (e.g. "
                    "[0.0, 0.005, 0.01, 0.02, 0.05]) and / or n_rings_candidates (e.g. [1, 2])"
                )
        if self.bit_budget is not None and self.method == "bivlm":
            floor = 1 + ring_index_bits(min(rings))
            if self.bit_budget < floor:
                raise ValueError(
                    f"bit_budget {self.bit_budget} is below what method 'bivlm' can reach with "
                    f"n_rings={min(rings)}: {floor} bits per weight (sign plus ring index) "
                    "before any scale; raise bit_budget or lower n_rings"
                )
        self.layer_config("language")
        self.layer_config("vision")
        return self

    # ----------------------------------------------------------------------------- config
    def layer_config(self, part: str) -> Any:
        """The core config for a module of ``part`` (``language`` or ``vision``).

        Bi-VLM gets every shared knob (with the modifier's defaults). A baseline gets only the
        shared knobs the recipe sets, under the baseline's own field names (its defaults are its
        authors'); a set knob the baseline has no field for is an error, never dropped.
        """
        _, config_cls = get_method(self.method)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        values = {name: getattr(self, name) for name in _SHARED_KNOBS}
        for name in ("p_sal_candidates", "p_sal_candidates_vision"):
            if values[name] is not None:
                values[name] = tuple(values[name])
        if self.method == "bivlm":
            chosen = set(_SHARED_KNOBS)
        else:
            chosen = set(_SHARED_KNOBS) & self.model_fields_set
        unused = sorted(k for k in chosen if _SHARED_KNOBS[k] not in fields)
        if unused:
            accepted = sorted(k for k, core in _SHARED_KNOBS.items() if core in fields)
            raise ValueError(
                f"recipe field(s) {unused} are not used by method {self.method!r}; remove them. "
                f"Fields it reads: {accepted}, plus method_args from {sorted(fields)}"
            )
        # Each part reads its own salient knobs; the vision encoder is held to bit_budget only
        # when it searches shares of its own (p_sal_candidates_vision).
        own = _VISION_KNOBS if part == "vision" else _LANGUAGE_KNOBS
        knobs = {_SHARED_KNOBS[k]: values[k] for k in chosen if k not in _PART_KNOBS - own}
        if part == "vision" and self.p_sal_candidates_vision is None and "bit_budget" in knobs:
            knobs["bit_budget"] = None
        if self.allocation == "model" and "bit_budget" in knobs:
            knobs["bit_budget"] = None  # a model-wide average (BitLedger), not a per-layer cap
        if self.method != "bivlm":
            clash = sorted(set(knobs) & set(self.method_args))
            if clash:
                raise ValueError(
                    f"method_args {clash} repeat recipe fields of method {self.method!r}; "
                    "set each once"
                )
        knobs.update(self.method_args)
        try:
            return config_cls(**knobs)
        except TypeError as exc:
            names = sorted(fields)
            raise ValueError(
                f"method_args {sorted(self.method_args)} do not fit method {self.method!r} "
                f"({exc}); its fields are {names}"
            ) from exc

    # -------------------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        ignore = list(self.ignore) + NEVER
        if not self.quantize_projector:
            ignore += self.projector_patterns
        self._modules = {}
        vision_re = [_compile(p) for p in self.vision_patterns]
        for name, module in match_named_modules(state.model, self.targets, ignore):
            if not isinstance(module, torch.nn.Linear):
                continue
            part = "vision" if any(r.match(name) for r in vision_re) else "language"
            if part == "vision" and self.scope == "language":
                continue
            self._modules[module] = (name, part)
        if not self._modules:
            raise ValueError(
                f"BiVLMModifier matched no nn.Linear with targets={self.targets}, "
                f"ignore={self.ignore}, scope={self.scope!r}; check the recipe's targets "
                "(e.g. [Linear] or 're:.*self_attn.*') against model.named_modules()"
            )
        if self.fold_scales:
            names = {m: name for m, (name, _) in self._modules.items()}
            self._fold_groups, skipped = resolve_fold_groups(state.model, names)
            if not self._fold_groups:
                raise ValueError(
                    f"fold_scales: true found nothing to fold in {type(state.model).__name__} "
                    f"(llm-compressor's AWQ mappings for it matched no norm / linear feeding "
                    f"quantized linears; skipped: {skipped[:4]}); remove fold_scales"
                )
            logger.info(
                "fold_scales: %d producers fold column scales, %d skipped",
                len(self._fold_groups),
                len(skipped),
            )
        if self.allocation == "model":
            total = sum(m.weight.numel() for m in self._modules)
            self._ledger = BitLedger(float(self.bit_budget), total)
        n_vis = sum(part == "vision" for _, part in self._modules.values())
        logger.info(
            "BiVLMModifier: %d language and %d vision linears to quantize with %s",
            len(self._modules) - n_vis,
            n_vis,
            self.method,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs) -> None:
        for module in self._modules:
            self.register_hook(module, self._accumulate, "forward")

    def _accumulate(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
        acc = self._hessians.get(module)
        if acc is None:
            acc = self._hessians[module] = HessianAccumulator(
                module.in_features, device=module.weight.device
            )
        acc.add(args[0].detach())

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs) -> None:
        group = list(self._hessians)
        start = time.perf_counter()
        folds = self._fold(group)
        self._fold_seconds += time.perf_counter() - start
        allocated = [m for m in group if self._allocated(self._modules[m][1])]
        for module in group:
            if module not in allocated:
                self._quantize_module(module)
        if allocated:
            self._quantize_group(allocated)
        start = time.perf_counter()
        self._resolve_folds(folds)
        self._fold_seconds += time.perf_counter() - start

    @torch.no_grad()
    def _fold(self, group: list[torch.nn.Module]) -> list[FoldGroup]:
        """Fold the initial column scales of every group whose readers calibrated in this
        subgraph (linear producers first, so a reader's weight is captured with its rows
        already scaled); their Hessians become diag(c) H diag(c)."""
        present = set(group)
        todo = []
        for g in self._fold_groups:
            if id(g) in self._folded or not all(r in present for r in g.readers):
                continue
            if g.producer in self._modules and g.producer not in present:
                logger.info(
                    "fold_scales: %s is quantized in another subgraph; not folded", g.producer_name
                )
                self._folded.add(id(g))
                continue
            todo.append(g)
        todo.sort(key=lambda g: not g.linear_producer)
        for g in todo:
            accs = [self._hessians[r] for r in g.readers]
            hessians = [a.hessian for a in accs]
            weights = self._reader_weights(g, hessians) if len(g.readers) > 1 else None
            for acc, h in zip(accs, g.fold(hessians, weights), strict=True):
                acc.hessian = h
            self._folded.add(id(g))
        return todo

    def _reader_weights(self, g: FoldGroup, hessians: list[torch.Tensor]) -> list[float]:
        """Each reader's relative calibration error under a cheap quantization (block code
        choice, no refinement, the recipe's salient share): how much it stands to gain from a
        column scale, so the shared scale leans toward it (``FoldGroup.fold``)."""
        quantize, _ = get_method(self.method)
        part = self._modules[g.readers[0]][1]
        cheap = dataclasses.replace(
            self.layer_config(part),
            code_choice="block",
            refine_iters=0,
            p_sal_candidates=None,
            bit_budget=None,
        )
        return [
            float(quantize(m.weight.data.float(), h, cheap).info["relative_error"])
            for m, h in zip(g.readers, hessians, strict=True)
        ]

    @torch.no_grad()
    def _resolve_folds(self, folds: list[FoldGroup]) -> None:
        """Re-solve each folded scale against its readers' codes (norm producers first, whose
        readers' codes a linear producer's correction then rescales) and record it."""
        for g in sorted(folds, key=lambda g: g.linear_producer):
            codes = [dequantize(self._codes[n]) for n in g.reader_names]
            own = self._codes.get(g.producer_name) if g.linear_producer else None
            info, errors, new = g.resolve(codes, self.dampening_frac, own)
            if new is not None:
                self._codes[g.producer_name] = new
            for name, error in zip(g.reader_names, errors, strict=True):
                i = next(i for i, r in enumerate(self._records) if r.name == name)
                rec = self._records[i]
                self._records[i] = dataclasses.replace(
                    rec, error=error, info={**rec.info, "folded_scale": info}
                )
            logger.info(
                "fold_scales: %s <- %s: error %.4g -> %.4g%s",
                g.producer_name,
                ", ".join(n.rsplit(".", 1)[-1] for n in g.reader_names),
                info["error_initial_scale"],
                info["error"],
                " (re-solved)" if info["resolved"] else "",
            )

    def _allocated(self, part: str) -> bool:
        """Whether modules of ``part`` choose among candidates by the model-wide ledger."""
        if self.allocation != "model":
            return False
        if part == "vision":
            return self.p_sal_candidates_vision is not None
        return True

    def on_calibration_end(self, state: State, event: Event, **kwargs) -> None:
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        if self._hessians:
            names = [self._modules[m][0] for m in self._hessians]
            raise RuntimeError(
                f"{len(names)} modules were calibrated but never quantized: {names[:5]}"
            )
        # A compressed save (model.save_pretrained) now writes the packed bivlm-binary format.
        from bivlm_plugin.integrations.llmcompressor.packed import attach_packed

        attach_packed(state.model, self._codes)
        return True

    def _take_hessian(self, module: torch.nn.Module) -> Any:
        name, part = self._modules[module]
        acc = self._hessians.pop(module)
        if acc.n_tokens == 0 or not torch.isfinite(acc.hessian).all():
            raise ValueError(
                f"{name}: calibration produced {'no inputs' if acc.n_tokens == 0 else 'NaN/inf'}"
                " for this layer; check that the calibration data reaches it (for VLMs: images "
                "with matching image tokens) or add it to `ignore`"
            )
        return acc.hessian

    @torch.no_grad()
    def _quantize_module(self, module: torch.nn.Module) -> None:
        name, part = self._modules[module]
        hessian = self._take_hessian(module)
        quantize, _ = get_method(self.method)
        start = time.perf_counter()
        weight = module.weight.data
        try:
            if self.method == "bivlm" and self.n_rings_candidates is not None:
                result = self._least_error_within_cap(weight, hessian, part)
            else:
                result = quantize(weight.float(), hessian, self.layer_config(part))
        except ValueError as exc:
            raise ValueError(f"{name} ({part}, {tuple(weight.shape)}): {exc}") from exc
        self._apply(module, result, time.perf_counter() - start)
        if self._ledger is not None:
            self._ledger.charge(result.bits.storage_bits, weight.numel())

    def _options(self, weight: torch.Tensor, hessian: torch.Tensor, part: str) -> LayerCandidates:
        config = dataclasses.replace(self.layer_config(part), bit_budget=None)
        return bivlm_candidates(weight.float(), hessian, config, self._rings())

    def _rings(self) -> tuple[int, ...]:
        return tuple(self.n_rings_candidates or (self.n_rings,))

    def _least_error_within_cap(
        self, weight: torch.Tensor, hessian: torch.Tensor, part: str
    ) -> QuantResult:
        cands = self._options(weight, hessian, part)
        cap = self.layer_config(part).bit_budget
        fits = [i for i, (b, _, _) in enumerate(cands.options) if cap is None or b <= cap]
        if not fits:
            cheapest = min(b for b, _, _ in cands.options)
            raise ValueError(
                f"no candidate (salient shares x n_rings_candidates {list(self._rings())}) fits "
                f"bit_budget={cap}; the smallest achievable is {cheapest:.4f} bits. Raise "
                "bit_budget or add smaller candidates"
            )
        return cands.finish(min(fits, key=lambda i: cands.options[i][1]))

    @torch.no_grad()
    def _quantize_group(self, modules: list[torch.nn.Module]) -> None:
        """Model-wide allocation: every candidate of every module (finished, or with
        ``candidate_search: encoded / refined`` only scored), the ledger's choice, then the
        chosen candidates finished."""
        assert self._ledger is not None
        start = time.perf_counter()
        tables, sizes = [], []
        for module in modules:
            name, part = self._modules[module]
            hessian = self._take_hessian(module)
            try:
                tables.append(self._options(module.weight.data, hessian, part))
            except ValueError as exc:
                raise ValueError(f"{name} ({part}, {tuple(module.weight.shape)}): {exc}") from exc
            sizes.append(module.weight.numel())
        left = self._ledger.left_per_weight
        col = 2 if self.allocation_error == "relative" else 1
        choice = self._ledger.allocate_group(
            [[(o[0], o[col]) for o in cands.options] for cands in tables], sizes
        )
        results = [cands.finish(c) for cands, c in zip(tables, choice, strict=True)]
        seconds = (time.perf_counter() - start) / len(modules)
        for module, cands, result in zip(modules, tables, results, strict=True):
            label = "error" if cands.search == "full" else "proxy_error"
            info = dict(result.info)
            info["allocation"] = {
                "budget_left_per_weight": left,
                "compared_on": label,
                "options": [
                    {
                        "p_sal": p,
                        "n_rings": r,
                        "storage_bits": b,
                        f"relative_{label}": rel,
                        label: err,
                    }
                    for (p, r), (b, err, rel) in zip(cands.keys, cands.options, strict=True)
                ],
            }
            self._apply(module, dataclasses.replace(result, info=info), seconds)
        logger.info(
            "bit ledger: group of %d layers at %.3f bits per weight (left %.3f); model so far "
            "%.3f of %.3f",
            len(modules),
            sum(r.bits.storage_bits * n for r, n in zip(results, sizes, strict=True)) / sum(sizes),
            left,
            self._ledger.average_bits,
            self._ledger.budget_bits,
        )

    def _apply(self, module: torch.nn.Module, result: QuantResult, seconds: float) -> None:
        name, part = self._modules[module]
        weight = module.weight.data
        weight.copy_(result.w_hat.to(weight.dtype))
        record = LayerRecord(
            name=name,
            part=part,
            shape=tuple(weight.shape),
            method=self.method,
            weight_bits=result.bits.weight_bits,
            storage_bits=result.bits.storage_bits,
            error=result.error,
            seconds=seconds,
            info=_jsonable(result.info),
        )
        self._records.append(record)
        if result.codes is not None:
            self._codes[name] = result.codes
        logger.info(
            "%s %s %s: %.3f storage bits, error %.4g, %.2f s%s",
            self.method,
            part,
            name,
            record.storage_bits,
            record.error or float("nan"),
            seconds,
            (
                f" (p_sal {result.info.get('p_sal')}, n_rings {result.info.get('n_rings')})"
                if self.method == "bivlm"
                else ""
            ),
        )

    # ---------------------------------------------------------------------------- results
    @property
    def records(self) -> list[LayerRecord]:
        return list(self._records)

    @property
    def folded_scales(self) -> dict[str, torch.Tensor]:
        """``fold_scales``: producer name -> (width,) scale folded into it (its output is c
        times the original; its readers' weights are divided by c)."""
        return {
            g.producer_name: g.producer_scale.clone()
            for g in self._fold_groups
            if id(g) in self._folded and g.scale is not None
        }

    @property
    def codes(self) -> dict[str, Any]:
        return dict(self._codes)

    def summary(self) -> dict[str, Any]:
        """Weight-count-weighted bits over every quantized layer, plus per-layer figures."""
        n = sum(r.shape[0] * r.shape[1] for r in self._records)
        if n == 0:
            return {"method": self.method, "n_layers": 0}

        def avg(attr: str) -> float:
            return sum(getattr(r, attr) * r.shape[0] * r.shape[1] for r in self._records) / n

        return {
            "method": self.method,
            "n_layers": len(self._records),
            "n_weights": n,
            "weight_bits": avg("weight_bits"),
            "storage_bits": avg("storage_bits"),
            "quantize_seconds": sum(r.seconds for r in self._records),
            # fold_scales' cheap reader pass and scale re-solves, outside quantize_seconds
            "fold_seconds": self._fold_seconds,
            **(
                {
                    "allocation": {
                        "mode": "model",
                        "bit_budget": self.bit_budget,
                        "error": self.allocation_error,
                    }
                }
                if self.allocation == "model"
                else {}
            ),
            "layers": [dataclasses.asdict(r) for r in self._records],
        }


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern[3:] if pattern.startswith("re:") else re.escape(pattern) + "$")


def _jsonable(info: Any) -> dict[str, Any]:
    out = {}
    for k, v in dict(info).items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[str(k)] = v
    return out


_REGISTERED = False


def register_modifiers() -> None:
    """Register with ModifierFactory under the class name (idempotent, safe in every process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from llmcompressor.modifiers.factory import ModifierFactory

    from bivlm_plugin.integrations.llmcompressor.gptq import VisionTowerGPTQModifier

    ModifierFactory.register("BiVLMModifier", BiVLMModifier)
    ModifierFactory.register("VisionTowerGPTQModifier", VisionTowerGPTQModifier)
    _REGISTERED = True


register_modifiers()
