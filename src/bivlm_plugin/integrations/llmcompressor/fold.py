"""Folded column scales (``BiVLMModifier.fold_scales``): zero-bit per-input-column scales.

The layers that read one input (q / k / v after ``input_layernorm``; gate / up after the MLP
norm; down after up) share one scale per input column c. Before quantizing, the input's
producer is scaled by c (a norm's weight, or the rows of a linear) and each reader's weight by
1 / c, so the model computes the same function; each reader is then binarized row-wise on
W diag(1/c) with Hessian diag(c) H diag(c): the column scales of ARB-RC, stored in the
producer, so the packed format and the kernels are unchanged and no bit is added. After the
readers are quantized, c is re-solved by least squares against their summed calibration error
(``core.colscale.solve_col_scale``) and the producer takes the correction.

Which layers feed which is llm-compressor's AWQ mapping table (``AWQ_MAPPING_REGISTRY``, by
model class; ``default_mappings`` otherwise), matched with compressed-tensors'
``match_modules_set``. A mapping is skipped, with a log line, where the shapes differ (v -> o
under grouped-query attention), where a reader is not quantized, or where the producer is
neither a linear nor a norm of the form ``n(x) * (offset + weight)`` (+ bias).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from bivlm_plugin.core.binarize import dequantize, round_params_fp16, scale_rows
from bivlm_plugin.core.colscale import (
    fold_norm_weight,
    initial_col_scale,
    solve_col_scale,
    tie_scale,
)
from bivlm_plugin.core.refine import layer_error

__all__ = ["FoldGroup", "norm_offset", "resolve_fold_groups"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FoldGroup:
    """One producer and the quantized linears that read its output.

    Attributes:
        producer_name / producer: the norm or linear whose output the readers take.
        reader_names / readers: the quantized linears (their columns are scaled).
        offset: the norm's weight offset (0 LLaMA, 1 Gemma), or None for a linear producer.
        tie: (in,) int64 producer output feeding each reader column, where they differ
            (grouped-query attention's v -> o: the query heads of a group share a value head,
            so their o_proj columns share its scale); None where column i is output i.
        scale: (in,) the readers' column scale (c0 after :meth:`fold`, c after
            :meth:`resolve`); the producer's output is scaled by :attr:`producer_scale`.
        targets / hessians: the readers' weights and Hessians before folding (for the re-solve).
    """

    producer_name: str
    producer: torch.nn.Module
    reader_names: list[str]
    readers: list[torch.nn.Module]
    offset: float | None
    tie: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    weights: list[float] = dataclasses.field(default_factory=list)
    targets: list[torch.Tensor] = dataclasses.field(default_factory=list)
    hessians: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def linear_producer(self) -> bool:
        return self.offset is None

    @property
    def producer_scale(self) -> torch.Tensor | None:
        """The scale of the producer's outputs (``scale`` itself unless tied)."""
        if self.scale is None or self.tie is None:
            return self.scale
        free = torch.zeros(int(self.tie.max()) + 1, device=self.scale.device)
        return free.index_copy_(0, self.tie, self.scale)

    @torch.no_grad()
    def fold(
        self, hessians: list[torch.Tensor], weights: list[float] | None = None
    ) -> list[torch.Tensor]:
        """Fold c0 in: the producer's output times c0, the readers' columns over c0.

        c0 is the geometric mean of the readers' own initial scales (``initial_col_scale``),
        weighted by ``weights``: the readers' relative errors of a cheap quantization pass,
        so the shared scale follows the reader that loses most (v_proj among q / k / v,
        up_proj beside gate_proj; measured on SmolLM2's calibration Hessians, RESULTS 9).

        Args:
            hessians: the readers' (in, in) Hessians, as calibrated.
            weights: one non-negative weight per reader; None: equal.

        Returns:
            Their Hessians of the inputs they now see, diag(c0) H diag(c0).
        """
        self.targets = [m.weight.data.to(torch.float32).clone() for m in self.readers]
        self.hessians = list(hessians)  # the caller swaps in new tensors; these stay as calibrated
        wt = torch.tensor(weights if weights is not None else [1.0] * len(self.readers))
        if not bool(torch.isfinite(wt).all()) or float(wt.sum()) <= 0:
            wt = torch.ones(len(self.readers))
        wt = wt / wt.sum()
        self.weights = [float(x) for x in wt]
        logs = torch.stack([initial_col_scale(w).log() for w in self.targets])
        c = (wt.unsqueeze(1).to(logs.dtype) * logs).sum(0).exp()
        if self.tie is not None:
            c = tie_scale(c, self.tie)[self.tie]
        self.scale = c
        for m, w in zip(self.readers, self.targets, strict=True):
            m.weight.data.copy_((w / c).to(m.weight.dtype))
        self._scale_producer(self.producer_scale, weight_too=True)
        return [h * c.unsqueeze(0) * c.unsqueeze(1) for h in hessians]

    @torch.no_grad()
    def resolve(self, codes: list[torch.Tensor], percdamp: float, producer_codes=None):
        """Re-solve c against the readers' codes (least squares on their summed relative
        error) and fold the correction c / c0 in where it lowers that sum.

        Args:
            codes: the readers' dequantized codes (they approximate W diag(1 / c0)).
            percdamp: damping of the least-squares solve.
            producer_codes: the producer's ``BinaryCodes`` when it is a quantized linear: the
                correction then rescales its code rows (``scale_rows``) instead of its weight.

        Returns:
            (info to record, the readers' errors tr(R H R^T) against their own weights, the
            producer's new codes or None).
        """
        assert self.scale is not None, "fold() first"
        c0 = self.scale

        def errors(c: torch.Tensor) -> list[float]:
            return [
                layer_error(w, q * c, h)
                for w, q, h in zip(self.targets, codes, self.hessians, strict=True)
            ]

        err0 = errors(c0)
        # The summed *relative* error: each reader's weight and codes over sqrt(tr(W H W^T)).
        norms = [
            max(layer_error(w, torch.zeros_like(w), h), 1e-30) ** 0.5
            for w, h in zip(self.targets, self.hessians, strict=True)
        ]
        c = solve_col_scale(
            [w / n for w, n in zip(self.targets, norms, strict=True)],
            [q / n for q, n in zip(codes, norms, strict=True)],
            self.hessians,
            c0,
            percdamp,
            self.tie,
        )
        ok = bool(torch.isfinite(c).all()) and bool((c > 0).all())
        err = errors(c) if ok else None

        def rel(e: list[float]) -> float:
            return sum(x / n**2 for x, n in zip(e, norms, strict=True))

        resolved = err is not None and rel(err) < rel(err0)
        new_codes = None
        if resolved:
            old = self.producer_scale
            self.scale = c
            factor = self.producer_scale / old
            if producer_codes is not None:
                new_codes = round_params_fp16(scale_rows(producer_codes, factor))
                w = self.producer.weight
                w.data.copy_(dequantize(new_codes).to(w.dtype))
            self._scale_producer(factor, weight_too=producer_codes is None)
        final = err if resolved else err0
        info = {
            "into": self.producer_name,
            "readers": list(self.reader_names),
            "resolved": resolved,
            "error_initial_scale": float(sum(err0)),
            "error": float(sum(final)),
            "relative_error_initial_scale": rel(err0),
            "relative_error": rel(final),
            "reader_weights": list(self.weights),
            "scale_min": float(self.scale.min()),
            "scale_max": float(self.scale.max()),
        }
        self.targets, self.hessians = [], []  # free the copies
        return info, final, new_codes

    def _scale_producer(self, factor: torch.Tensor, weight_too: bool) -> None:
        p = self.producer
        if weight_too and self.offset is None:  # a linear: its output rows
            p.weight.data.mul_(factor.to(p.weight.dtype).unsqueeze(1))
        elif self.offset is not None:
            w = fold_norm_weight(p.weight.data, factor, self.offset)
            p.weight.data.copy_(w.to(p.weight.dtype))
        bias = getattr(p, "bias", None)
        if bias is not None:
            bias.data.mul_(factor.to(bias.dtype))


@torch.no_grad()
def norm_offset(norm: torch.nn.Module) -> float | None:
    """0 or 1 where ``norm(x) = n(x) * (offset + weight) (+ bias)``, probed numerically; None
    for anything else (its output cannot be rescaled through its weight)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    saved = weight.data.clone()
    bias = getattr(norm, "bias", None)
    b = bias.data.to(torch.float32) if isinstance(bias, torch.Tensor) else 0.0
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0))
    x = x.to(weight.device, weight.dtype)
    try:
        weight.data.zero_()
        y0 = norm(x).to(torch.float32) - b
        weight.data.fill_(1.0)
        y1 = norm(x).to(torch.float32) - b
    except Exception:  # noqa: BLE001 (a module that is not a norm: not foldable)
        return None
    finally:
        weight.data.copy_(saved)
    d = y1 - y0  # n(x) either way
    if float(d.abs().max()) == 0:
        return None
    offset = float((y0 * d).sum() / (d * d).sum())
    for candidate in (0.0, 1.0):
        if torch.allclose(y0, candidate * d, rtol=1e-2, atol=1e-2 * float(d.abs().max())):
            return candidate
    logger.info("fold_scales: %s has weight offset %.3f; not folded", type(norm).__name__, offset)
    return None


def resolve_fold_groups(model: torch.nn.Module, quantized: dict[torch.nn.Module, str]):
    """The producer -> readers groups of ``model`` whose readers are all in ``quantized``
    (module -> name), from llm-compressor's AWQ mapping table for the model's class."""
    from compressed_tensors.utils import match_modules_set
    from llmcompressor.modifiers.transform.awq.mappings import (
        AWQ_MAPPING_REGISTRY,
        default_mappings,
    )

    names = {m: n for n, m in model.named_modules()}
    mappings = AWQ_MAPPING_REGISTRY.get(type(model).__name__, default_mappings)
    groups: list[FoldGroup] = []
    skipped: list[str] = []
    for mapping in mappings:
        try:
            patterns = (mapping.smooth_layer, *mapping.balance_layers)
            matched = list(match_modules_set(model, patterns))
        except ValueError as exc:  # a pattern this model does not have
            logger.info("fold_scales: mapping %s not used: %s", mapping.smooth_layer, exc)
            continue
        for producer_set, *reader_sets in matched:
            readers = [m for s in reader_sets for m in s]
            if len(producer_set) != 1 or not readers:
                continue
            producer = producer_set[0]
            pname = names[producer]
            width = {m.in_features for m in readers if isinstance(m, torch.nn.Linear)}
            if len(width) != 1 or not all(isinstance(m, torch.nn.Linear) for m in readers):
                skipped.append(f"{pname} (readers are not linears of one input width)")
                continue
            if not all(m in quantized for m in readers):
                skipped.append(f"{pname} (a reader is not quantized)")
                continue
            if isinstance(producer, torch.nn.Linear):
                offset, out = None, producer.out_features
            else:
                offset = norm_offset(producer)
                out = producer.weight.numel() if offset is not None else None
            tie = None
            if offset is None and out != next(iter(width)):
                tie = _gqa_tie(model, out, next(iter(width)))
            if out != next(iter(width)) and tie is None:
                skipped.append(
                    f"{pname} (output width {out} vs readers' input {next(iter(width))}"
                    + (", not grouped-query attention's v -> o)" if out else ")")
                )
                continue
            groups.append(
                FoldGroup(pname, producer, [quantized[m] for m in readers], readers, offset, tie)
            )
    if skipped:
        logger.info("fold_scales: %d producer(s) not folded: %s", len(skipped), skipped[:8])
    return groups, skipped


def _gqa_tie(model: torch.nn.Module, out: int, width: int) -> torch.Tensor | None:
    """o_proj column -> v_proj row under grouped-query attention (query head h reads value
    head h // (heads / kv_heads), as transformers' ``repeat_kv``), or None if the text
    config's heads do not explain ``out`` -> ``width``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if not heads or not kv or heads % kv:
        return None
    hd = getattr(text, "head_dim", None) or text.hidden_size // heads
    if out != kv * hd or width != heads * hd:
        return None
    j = torch.arange(width)
    return (j // hd) // (heads // kv) * hd + j % hd
