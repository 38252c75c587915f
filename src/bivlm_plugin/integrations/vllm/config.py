"""``BiVLMVllmConfig``: vLLM's quantization config for packed ``bivlm-binary`` checkpoints.

A packed checkpoint's ``quantization_config`` is a compressed-tensors config whose top-level
``format`` is ``"bivlm-binary"`` (``docs/FORMAT.md``). vLLM resolves ``quant_method``
(``"compressed-tensors"``) unless some config's ``override_quantization_method`` claims the
checkpoint first; vLLM asks registered (custom) configs before its own override list and its
compressed-tensors config never overrides, so ``override_quantization_method`` returning
``"bivlm"`` for ``format == "bivlm-binary"`` routes the checkpoint here whether or not the user
passes ``--quantization bivlm``. vLLM's compressed-tensors loader never sees it.

Layouts (rings, salient k, scale / mean modes) are not in the config: they follow from the stored
tensor shapes, read here from the safetensors headers (no tensor data) the first time a layer is
built, keyed by the model's (vLLM) module names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from bivlm_plugin.format.checkpoint import (
    FORMAT_NAME,
    is_bivlm_config,
    packed_modules_in_files,
)

__all__ = ["QUANT_METHOD", "BiVLMVllmConfig"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "bivlm"
# A user may ask for the checkpoint's own quant_method; vLLM's compressed-tensors loader cannot
# read bivlm-binary tensors, so the checkpoint is claimed then too.
_CLAIMABLE_USER_METHODS = (None, QUANT_METHOD, "compressed-tensors")

Entries = dict[str, tuple[str, list[int], int]]


class BiVLMVllmConfig(QuantizationConfig):
    """The stored ``quantization_config`` of a packed Bi-VLM checkpoint, for vLLM.

    Args:
        targets: packed modules (checkpoint / HF names).
        ignore: modules that stay dense (informational: anything not targeted stays dense).
    """

    def __init__(self, targets: list[str], ignore: list[str] | None = None) -> None:
        super().__init__()
        self.targets = set(targets)
        self.ignore = list(ignore or [])
        self.model_path: str | None = None
        self.revision: str | None = None
        self._mappers: list[Any] = []
        self._stored: dict[str, Entries] | None = None

    def __repr__(self) -> str:
        return f"BiVLMVllmConfig(targets={len(self.targets)}, model_path={self.model_path!r})"

    # ----------------------------------------------------------------- QuantizationConfig API
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the Triton kernel's floor; CPU reports no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BiVLMVllmConfig:
        if not is_bivlm_config(config):
            raise ValueError(
                f"quantization_config.format is {config.get('format')!r}, expected "
                f"{FORMAT_NAME!r}: not a packed Bi-VLM checkpoint (load it without "
                "--quantization bivlm)"
            )
        groups = config.get("config_groups") or {}
        targets = [
            t for g in groups.values() if g.get("format") == FORMAT_NAME for t in g["targets"]
        ]
        bad = [t for t in targets if t.startswith("re:")]
        if bad:
            raise ValueError(
                f"bivlm-binary targets must be plain module names, got patterns {bad[:3]}"
            )
        return cls(targets, config.get("ignore"))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        if is_bivlm_config(hf_quant_cfg) and user_quant in _CLAIMABLE_USER_METHODS:
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # vLLM applies each model class's rename mapper in turn (outer model, then inner ones):
        # the stored keys go through the same chain in ``_rename``.
        self._mappers.append(hf_to_vllm_mapper)
        self.targets = set(hf_to_vllm_mapper.apply_list(sorted(self.targets)))
        self._stored = None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        self.model_path = model_name
        self.revision = revision

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        parts = self.part_names(prefix)
        stored = self._stored_names()
        hit = [p in self.targets or p in stored for p in parts]
        if all(hit):
            from .linear_method import BiVLMLinearMethod

            return BiVLMLinearMethod(self, prefix)
        if any(hit):
            raise ValueError(
                f"{prefix} fuses {parts}, of which only "
                f"{[p for p, h in zip(parts, hit, strict=True) if h]} are packed; vLLM needs all "
                "fused siblings (q/k/v, gate/up) quantized alike: re-quantize with all of them "
                "targeted or all ignored"
            )
        return UnquantizedLinearMethod()

    # --------------------------------------------------------------------------- our helpers
    def part_names(self, prefix: str) -> list[str]:
        """Checkpoint module names (after the model's renaming) that ``prefix`` fuses."""
        parent, _, leaf = prefix.rpartition(".")
        subs = self.packed_modules_mapping.get(leaf)
        if not subs:
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in subs]

    def stored_entries(self, name: str) -> Entries:
        """Header entries ``{tensor: (dtype, shape, bytes)}`` of packed module ``name``."""
        stored = self._load_stored()
        if name not in stored:
            raise ValueError(
                f"quantization_config targets {name!r} but the checkpoint at "
                f"{self.model_path!r} stores no {name}.signs (stored packed modules: "
                f"{sorted(stored)[:4]}...); the checkpoint is incomplete or was written for "
                "another architecture"
            )
        return stored[name]

    def _stored_names(self) -> set[str] | dict[str, Entries]:
        """Packed modules found in the files (vLLM names), or nothing before the path is known.

        The files are the ground truth: a config's ``targets`` are transformers module names,
        which can differ from the checkpoint's key layout (transformers 5 flattens CLIP's
        ``vision_model``; ``bivlm quantize`` writes the legacy keys vLLM expects).
        """
        if self.model_path is None:
            return set()
        return self._load_stored()

    def _load_stored(self) -> dict[str, Entries]:
        if self._stored is None:
            files = _safetensors_files(self._resolve_path(), self.revision)
            raw = packed_modules_in_files(files)
            self._stored = {self._rename(k): v for k, v in raw.items()}
            logger.info("bivlm: %d packed modules in %d files", len(self._stored), len(files))
        return self._stored

    def _rename(self, key: str) -> str:
        name = f"{key}.signs"
        for mapper in self._mappers:
            mapped = mapper.apply_list([name])
            name = mapped[0] if mapped else name
        return name.removesuffix(".signs")

    def _resolve_path(self) -> str:
        if self.model_path is None:
            from vllm.config import get_current_vllm_config

            self.model_path = get_current_vllm_config().model_config.model
        return self.model_path


def _safetensors_files(model: str, revision: str | None) -> list[Path]:
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(model, revision=revision, allow_patterns=["*.safetensors", "*.json"])
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {path}: bivlm-binary checkpoints are safetensors only"
        )
    return files
