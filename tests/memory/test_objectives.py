"""The estimator knows each objective: paired objectives cost 2x the sequences' activations, GRPO
its rollouts' tokens and a generation moment with the KV cache."""

from __future__ import annotations

from qlora_trainer.config import config_from_dict
from qlora_trainer.memory.estimate import estimate_for_config
from qlora_trainer.memory.objectives import estimate_for_objective, step_shape


def _cfg(objective: str, **extra):
    fmt = {"sft": "instruction", "kto": "unpaired", "grpo": "prompt_only"}.get(objective, "preference")
    raw = {"model": {"name_or_path": "llama-2-7b"}, "data": {"seq_len": 512, "format": fmt},
           "train": {"batch_size": 2, "objective": objective}, **extra}
    if objective == "grpo":
        raw["grpo"] = {"rewards": ["gsm8k_exact"], "num_generations": 8, "max_completion_length": 256}
    return config_from_dict(raw).validate()


def test_step_shapes():
    assert step_shape(_cfg("sft")) == (2, 512)
    assert step_shape(_cfg("dpo")) == step_shape(_cfg("simpo")) == (4, 512)
    assert step_shape(_cfg("kto")) == (2, 512)
    assert step_shape(_cfg("grpo")) == (16, 768)


def test_paired_costs_the_activations_of_twice_the_batch():
    sft, dpo = estimate_for_objective(_cfg("sft")), estimate_for_objective(_cfg("dpo"))
    same_as_4 = estimate_for_config(config_from_dict(
        {"model": {"name_or_path": "llama-2-7b"}, "data": {"seq_len": 512}, "train": {"batch_size": 4}}).validate())
    assert dpo.allocated_bytes == same_as_4.allocated_bytes > sft.allocated_bytes
    assert dpo.settings["objective"] == "dpo"


def test_grpo_adds_the_generation_moment():
    est = estimate_for_objective(_cfg("grpo"))
    gen = est.phases["generation"]
    assert gen["kv_cache"] == 2 * 32 * 32 * 128 * 16 * 768 * 2  # K and V, 32 layers x 32 heads x 128, 16 rows
    assert any("rollouts" in n for n in est.notes)
