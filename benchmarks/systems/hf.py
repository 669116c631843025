"""The HF stack as its users run it: ``AutoModelForCausalLM.from_pretrained`` with
``BitsAndBytesConfig`` (NF4, double quant, compute in the run dtype), PEFT's
``prepare_model_for_kbit_training`` (non-reentrant gradient checkpointing), ``LoraConfig(r=16,
lora_alpha=32, target_modules="all-linear")`` and bitsandbytes paged AdamW 8-bit.

70B models load the identical tensors in-process (benchmarks.weights; their bf16 checkpoint does not
fit the GPU machine's disk), then go through the same PEFT steps.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Built, built_from_peft_model, system_main
from benchmarks.spec import RunSpec


def load_model(spec: RunSpec):
    """The NF4 base model, loaded as ``from_pretrained`` users do (or built in-process for 70B), its
    4-bit layers computed by bitsandbytes, with bitsandbytes' lossy AVX512-BF16 CPU repacking off
    (``claim_4bit_layers(own_compute=False)``; a no-op on CUDA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_trainer.models.nf4_linear import claim_4bit_layers

    if spec.weights == "in_process":
        from benchmarks.weights import build_nf4_in_process

        model = build_nf4_in_process(spec.model, seed=spec.seed, device=torch.device(spec.device),
                                     dtype=spec.torch_dtype)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=spec.torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(spec.checkpoint_dir, quantization_config=q,
                                                     dtype=spec.torch_dtype, device_map={"": spec.device},
                                                     attn_implementation="sdpa")
    claim_4bit_layers(model, own_compute=False)
    return model


def build(spec: RunSpec, upcast: bool = True) -> Built:
    """``upcast``: PEFT's ``prepare_model_for_kbit_training`` (fp32 copies of embeddings, norms and
    lm_head); False (``hf-tuned``) does the rest of that recipe only: freeze, non-reentrant
    checkpointing, input grads."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_model(spec)
    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.requires_grad_(False)
    if not model.is_gradient_checkpointing:  # in-process models are not flagged as loaded in 4 bit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(spec.seed)
    model = get_peft_model(model, lora)
    return built_from_peft_model(model, spec)


if __name__ == "__main__":
    raise SystemExit(system_main("hf", build))
