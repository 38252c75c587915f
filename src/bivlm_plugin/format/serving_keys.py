"""Checkpoint keys in the layout serving engines read, where transformers 5 saves another.

transformers 5.17 flattened CLIP's vision model (``CLIPVisionModel`` lost its ``vision_model``
child and reads old checkpoints through a ``PrefixChange``), but saves LLaVA's vision tower as
``vision_tower.<...>`` without restoring that prefix. vLLM 0.32, like every published LLaVA
checkpoint, expects ``vision_tower.vision_model.<...>``: a LLaVA saved by transformers 5.17 does
not load in vLLM, dense or packed (measured: "There is no module or parameter named
'vision_tower.embeddings' in LlavaForConditionalGeneration"). transformers reads both layouts, so
``bivlm quantize`` writes the published one.

Only this module knows the renames; add a family here when its saved keys and the published
ones differ.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["published_key_renames", "rewrite_checkpoint_keys"]

# (model_type, vision_config.model_type) -> [(pattern, replacement)] applied to every key.
_RENAMES: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("llava", "clip_vision_model"): [
        (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    ],
}


def published_key_renames(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], str]]:
    """The key renames that turn transformers 5.17's saved layout into the published one."""
    vision = (config.get("vision_config") or {}).get("model_type", "")
    rules = _RENAMES.get((config.get("model_type", ""), vision), [])
    return [(re.compile(p), r) for p, r in rules]


def _rename(key: str, renames: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in renames:
        key = pattern.sub(repl, key)
    return key


def rewrite_checkpoint_keys(folder: str | Path) -> int:
    """Rename the keys of every safetensors file in ``folder`` (and its index) in place.

    Meant for a folder that is still being written (``atomic_directory``'s temporary one).
    Returns the number of renamed keys (0 when the model's family needs none).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    renames = published_key_renames(config)
    if not renames:
        return 0
    count = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {_rename(k, renames): f.get_tensor(k) for k in f.keys()}
            count += sum(1 for k in f.keys() if _rename(k, renames) != k)
        save_file(tensors, path, metadata=metadata)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_rename(k, renames): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
    return count
