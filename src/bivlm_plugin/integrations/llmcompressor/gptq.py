"""``VisionTowerGPTQModifier``: llm-compressor's GPTQ, able to quantize a VLM's vision tower.

llm-compressor 0.14's sequential pipeline traces the model and wraps code it cannot trace (a
VLM's image branch, ``if pixel_values is not None: ...``) into opaque functions. Modules called
inside such a function (every vision-tower linear of LLaVA) still run their GPTQ hooks, so they
accumulate Hessians, but they are missing from the subgraph's module list, so
``GPTQModifier.on_sequential_epoch_end`` never observes their weights and
``compress_modules`` fails with ``No statistics available. Call observer(value) first.``

This subclass passes those calibrated-but-unlisted modules to the parent's epoch end as well.
The GPTQ math, the observers and the saved format are the parent's, unchanged: it is the peer
run faithfully on the whole VLM, not a variant of it. Recipes name it where they target the
vision tower (``recipes/gptq_*_vlm.yaml``); language-model-only recipes use ``GPTQModifier``.
"""

from __future__ import annotations

from llmcompressor.modifiers.gptq import GPTQModifier

__all__ = ["VisionTowerGPTQModifier"]


class VisionTowerGPTQModifier(GPTQModifier):
    """``GPTQModifier`` whose epoch end also covers modules calibrated inside untraced code."""

    def on_sequential_epoch_end(self, state, event, modules, **kwargs):
        listed = set(modules)
        unlisted = [m for m in self._num_samples if m not in listed]
        return super().on_sequential_epoch_end(state, event, list(modules) + unlisted, **kwargs)
