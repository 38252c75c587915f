"""Optimum-style entry points: ``BiVLMForCausalLM`` and ``BiVLMForImageTextToText``.

For people used to optimum-quanto's ``QuantizedModelForCausalLM``::

    from bivlm_plugin.auto import BiVLMForCausalLM

    BiVLMForCausalLM.quantize("smollm2", "recipes/bivlm_lm_w1.yaml", "smollm2-bivlm")
    model = BiVLMForCausalLM.from_pretrained("smollm2-bivlm")  # BinaryLinear, kept packed

``from_pretrained`` is transformers' ``AutoModelFor*.from_pretrained`` with the plugin
registered (it checks that the folder is a packed Bi-VLM checkpoint first, so a dense folder is
not silently loaded dense); ``quantize`` is ``bivlm quantize`` as a function. This module
composes integrations (like ``cli.py``) and imports them only when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BiVLMForCausalLM", "BiVLMForImageTextToText"]


class _BiVLMAuto:
    _auto_class: str

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any):
        """Load a packed Bi-VLM checkpoint (``bivlm quantize`` output) with weights kept packed.

        Args:
            model_dir: the checkpoint folder.
            kwargs: passed to ``transformers.AutoModelFor*.from_pretrained`` (e.g. ``dtype``).
        """
        import transformers

        import bivlm_plugin  # noqa: F401  (registers the quantizer with transformers)
        from bivlm_plugin.format.checkpoint import FORMAT_NAME, is_bivlm_config

        config = Path(model_dir) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
        qcfg = json.loads(config.read_text()).get("quantization_config")
        if not is_bivlm_config(qcfg):
            raise ValueError(
                f"{model_dir} is not a packed {FORMAT_NAME} checkpoint (its quantization_config "
                f"format is {(qcfg or {}).get('format')!r}); create one with "
                f"{cls.__name__}.quantize(...) or `bivlm quantize`"
            )
        return getattr(transformers, cls._auto_class).from_pretrained(model_dir, **kwargs)

    @classmethod
    def quantize(
        cls, model_dir: str | Path, recipe: str | Path, output: str | Path, **kwargs: Any
    ) -> dict[str, Any]:
        """Quantize ``model_dir`` with ``recipe`` and save the packed checkpoint to ``output``.

        Args:
            kwargs: as ``quantize_model`` (``num_calibration_samples``, ``data``, ``overwrite``,
                ``overrides``, ``fake_quant``).

        Returns:
            The report also written to ``output/bivlm_report.json``.
        """
        from bivlm_plugin.app.quantize import quantize_model

        return quantize_model(model_dir, recipe, output, **kwargs)


class BiVLMForCausalLM(_BiVLMAuto):
    """Text models: ``AutoModelForCausalLM`` with Bi-VLM layers kept packed."""

    _auto_class = "AutoModelForCausalLM"


class BiVLMForImageTextToText(_BiVLMAuto):
    """VLMs: ``AutoModelForImageTextToText`` with Bi-VLM layers kept packed."""

    _auto_class = "AutoModelForImageTextToText"
