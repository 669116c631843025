"""What vLLM serves as is: the merged 16-bit HF directory (``vllm serve DIR``) with
``generation_config.json`` (the end-of-turn token among the EOS ids, so generation stops at the end of
the answer) and the chat template, and the LoRA adapter directory for ``--enable-lora --lora-modules
NAME=DIR`` in plain PEFT form.

vLLM's LoRA loader takes ``adapter_config.json`` + ``adapter_model.safetensors`` with lora_A/lora_B
only, one scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for every layer: no DoRA magnitudes, no
AdaLoRA, no ``alpha_pattern``/``rank_pattern`` (ignored there), no biases, no ``modules_to_save`` or
trained token rows; ranks above ``--max-lora-rank`` (default 16) need that flag raised. Those are
refused or named here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.export.vocab import serving_template
from qlora_trainer.io import atomic_directory, read_json_object
from qlora_trainer.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter

_DROP = ("trainable_token_indices", "modules_to_save")


def generation_config(model: nn.Module, tokenizer: Any, eot: str | None) -> Any:
    """The model's ``GenerationConfig`` with BOS/EOS/PAD from the tokenizer and ``eot`` added to the EOS ids."""
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if eot is not None and eot in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids(eot))
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = eos[0] if len(eos) == 1 else (list(dict.fromkeys(eos)) or None)
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def write_vllm_model(model: nn.Module, tokenizer: Any, out: Path, *, chat_template: str | None,
                     eot: str | None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the dense ``model`` in ``dtype`` with the tokenizer, chat template and generation config to
    ``out`` (a directory; whole or not at all)."""

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise QloraError(f"export --to vllm: dtype {dtype} (bfloat16, float16 or float32)")
    model = model.to(dtype)
    model.config.use_cache = True
    model.generation_config = generation_config(model, tokenizer, eot)
    if chat_template:
        tokenizer.chat_template = serving_template(chat_template)
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out


def check_vllm_adapter(config: dict[str, Any], weights: Any, where: str) -> None:
    """One-line refusal of adapters vLLM's LoRA loader does not take."""
    if config.get("use_dora"):
        raise QloraError(f"{where}: vLLM serves no DoRA adapters; export the merged model (--to vllm from the "
                         f"adapter writes it)")
    if config.get("peft_type") == "ADALORA":
        raise QloraError(f"{where}: vLLM serves no AdaLoRA adapters; export the merged model instead")
    for key in ("alpha_pattern", "rank_pattern"):
        if config.get(key):
            raise QloraError(f"{where}: {key} is set, which vLLM ignores (it scales every layer by lora_alpha / r); "
                             f"export the merged model instead")
    if config.get("bias", "none") != "none":
        raise QloraError(f"{where}: bias={config['bias']!r}: vLLM serves LoRA adapters without biases only")
    if any(config.get(k) for k in _DROP) or weights.token_rows:
        raise QloraError(f"{where}: the adapter trains embedding rows or whole modules, which vLLM's LoRA "
                         f"loader does not take; export the merged model instead")


def write_vllm_adapter(adapter_dir: Path, out: Path) -> tuple[Path, int]:
    """Copy a PEFT adapter into ``out`` as vLLM loads it (our run files left out). Returns (out, the
    largest rank, for ``--max-lora-rank``)."""

    adapter_dir = Path(adapter_dir)
    weights = read_adapter(adapter_dir)
    config = read_json_object(adapter_dir / CONFIG_NAME)
    check_vllm_adapter(config, weights, str(adapter_dir))
    config = {k: v for k, v in config.items() if k not in _DROP}
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / WEIGHTS_NAME).write_bytes((adapter_dir / WEIGHTS_NAME).read_bytes())
    return out, max(lw.r for lw in weights.layers.values())
