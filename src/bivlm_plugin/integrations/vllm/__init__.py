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

__all__ = ["register", "request_amx"]

logger = logging.getLogger(__name__)


def request_amx() -> bool:
    """Ask Linux for this process's permission to run AMX tile instructions, where the CPU
    has them; True when granted (False where there is no AMX or the request failed).

    vLLM's CPU attention takes its AMX kernel for bf16 wherever CPUID lists AMX tiles, but a
    Linux process may run AMX instructions only after asking (``arch_prctl``
    ``ARCH_REQ_XCOMP_PERM``). oneDNN asks on its first bf16 matmul, so a dense model never
    notices; a packed model, whose linears run our kernel and never reach oneDNN, died with
    SIGILL in its first attention call (vLLM 0.32.0, bf16, Xeon with ``amx_tile``,
    2026-12-04). ``torch.cpu._init_amx`` asks once per process; asking again is harmless.
    """
    import torch

    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    init = getattr(torch.cpu, "_init_amx", None)
    if supported is None or init is None or not supported():
        return False
    granted = bool(init())
    if not granted:
        logger.warning(
            "bivlm: the CPU lists AMX tiles but the kernel refused this process AMX; vLLM's "
            "bf16 CPU attention may fail with an illegal instruction: serve with --dtype "
            "float32 there"
        )
    return granted


def register() -> None:
    """Register ``BiVLMVllmConfig`` as vLLM quantization method ``"bivlm"`` and the
    visual-token pruning LLaVA (``pruning.py``); idempotent. Also asks for AMX permission in
    this process (``request_amx``), which vLLM's AMX attention needs and never asks for."""
    from vllm.model_executor.layers import quantization as vq

    from .config import QUANT_METHOD, BiVLMVllmConfig
    from .pruning import register_pruning_models

    request_amx()
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
