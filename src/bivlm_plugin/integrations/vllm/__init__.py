"""vLLM integration: serve packed ``bivlm-binary`` checkpoints with the weights kept packed.

``register()`` is the ``vllm.general_plugins`` entry point (``pyproject.toml``): vLLM calls it in
every process (front end, engine core, workers) before building a model. It registers
``BiVLMVllmConfig`` under ``quantization="bivlm"``; the config's
``override_quantization_method`` then claims every checkpoint whose
``quantization_config.format`` is ``"bivlm-binary"``, so ``vllm serve <dir>`` and
``LLM(model=dir)`` need no ``--quantization`` flag.

Calling ``register`` any number of times is harmless. Importing this package imports vLLM.
"""

from __future__ import annotations

import logging

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register() -> None:
    """Register ``BiVLMVllmConfig`` as vLLM quantization method ``"bivlm"`` and the
    visual-token pruning LLaVA (``pruning.py``); idempotent."""
    from vllm.model_executor.layers import quantization as vq

    from .config import QUANT_METHOD, BiVLMVllmConfig
    from .pruning import register_pruning_models

    register_pruning_models()  # visual-token pruning hook, off unless the config turns it on
    current = vq._CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD)
    if current is BiVLMVllmConfig:
        return
    if current is not None and current.__qualname__ != BiVLMVllmConfig.__qualname__:
        raise RuntimeError(
            f"vLLM already has {current.__module__}.{current.__qualname__} registered for "
            f"quantization={QUANT_METHOD!r}; another package claims the name"
        )
    vq.register_quantization_config(QUANT_METHOD)(BiVLMVllmConfig)
    logger.debug("bivlm: registered vLLM quantization method %r", QUANT_METHOD)
