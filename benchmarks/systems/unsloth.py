"""Unsloth as its users run it: ``FastLanguageModel.from_pretrained(dir, load_in_4bit=True)``,
``get_peft_model`` with r=16, alpha=32 on all seven projections, ``use_gradient_checkpointing="unsloth"``
and bitsandbytes paged AdamW 8-bit.

A benchmark peer only (never a dependency): skipped cleanly when not importable, without a CUDA GPU,
or without a checkpoint directory (70B). ``unsloth`` is imported before anything imports transformers.
"""

from __future__ import annotations

import importlib.util

import torch

from benchmarks.harness import Built, Skip, built_from_peft_model, system_main
from benchmarks.spec import RunSpec
from benchmarks.systems import UNSLOTH_MISSING

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(spec: RunSpec) -> Built:
    if importlib.util.find_spec("unsloth") is None:
        raise Skip(UNSLOTH_MISSING)
    if not (spec.device.startswith("cuda") and torch.cuda.is_available()):
        raise Skip("unsloth needs a CUDA GPU")
    if spec.weights != "checkpoint" or not spec.checkpoint_dir:
        raise Skip("unsloth loads from a checkpoint directory; this model's does not fit the disk")
    from unsloth import FastLanguageModel  # before transformers / peft

    model, _ = FastLanguageModel.from_pretrained(model_name=spec.checkpoint_dir, max_seq_length=spec.seq_len,
                                                 dtype=spec.torch_dtype, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=spec.seed)
    return built_from_peft_model(model, spec)


if __name__ == "__main__":
    raise SystemExit(system_main("unsloth", build))
