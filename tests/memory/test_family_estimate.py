"""The estimate for the families beyond Llama: per-component answers for their catalog entries
(Qwen2-MoE's shared expert as a dense NF4 MLP, biases and LayerNorm biases 16-bit), the 24 / 48 GB
verdicts at seq 2048, and ``qlora-trainer memory`` on a saved model directory of every family of
the family matrix."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.cli import main
from qlora_trainer.memory.estimate import estimate
from qlora_trainer.memory.quant import nf4_weight_bytes
from qlora_trainer.models.catalog import get_arch, linear_shapes, param_counts
from qlora_trainer.models.families import FAMILIES, MOE, family_config

# (fits 24 GB, fits 48 GB) of the default estimate (ours, r 16 all-linear, paged AdamW 8-bit) at seq 2048
VERDICTS = {"gemma-7b": (True, True), "granite-3.3-8b": (True, True), "olmo-3-7b": (True, True),
            "smollm3-3b": (True, True), "glm-4-9b": (True, True), "command-r-35b": (False, True),
            "starcoder2-15b": (True, True), "qwen1.5-moe-a2.7b": (True, True), "olmoe-1b-7b": (True, True),
            "phi-3.5-moe": (False, True), "granite-3.1-3b-a800m": (True, True)}


@pytest.mark.parametrize("name, verdict", sorted(VERDICTS.items()))
def test_cli_answers_per_component_with_the_verdict(name, verdict, capsys):
    assert main(["memory", name, "--seq", "2048", "--budget", "24", "--json"]) == (0 if verdict[0] else 1)
    d = json.loads(capsys.readouterr().out)
    arch = get_arch(name)
    assert d["components"]["base_nf4"] > 0 and (("experts_nf4" in d["components"]) == arch.is_moe)
    assert estimate(arch, seq_len=2048).fits(48) == verdict[1]


def test_qwen2_moe_shared_expert_is_a_dense_nf4_mlp_with_adapters():
    arch = get_arch("qwen1.5-moe-a2.7b")
    est = estimate(arch, seq_len=2048)
    shared = [s for s in linear_shapes(arch) if s[0].startswith("shared_expert")]
    attention = [s for s in linear_shapes(arch) if not s[0].startswith("shared_expert")]
    assert est.components["base_nf4"] == arch.layers * sum(nf4_weight_bytes(i * o) for _, i, o, _ in shared + attention)
    assert est.components["router"] == 2 * arch.layers * arch.experts * arch.hidden  # 16-bit, the gate is a linear
    mlp_only = estimate(arch, seq_len=2048, targets=["shared_expert.gate_proj", "shared_expert.up_proj",
                                                      "shared_expert.down_proj"], lora_experts=False)
    assert mlp_only.components["lora_params"] == 2 * arch.layers * 16 * 3 * (arch.hidden + arch.shared_intermediate)


def test_qwen2_moe_activations_count_the_shared_expert():
    """Each token runs through 4 routed experts of 1408 and the shared expert of 5632."""
    arch = get_arch("qwen1.5-moe-a2.7b")
    short, long = (estimate(arch, seq_len=s, checkpointing=False) for s in (1024, 2048))
    per_token = (long.components["activations"] - short.components["activations"]) / 1024 / arch.layers
    assert per_token > 2 * 3 * (4 * 1408 + 5632)


def test_biases_and_layernorm_biases_stay_16_bit():
    star = get_arch("starcoder2-15b")
    c = param_counts(star)
    assert c["biases"] == star.layers * (2 * 6144 + 2 * 4 * 128 + 24576 + 6144)  # q, o, k, v, c_fc, c_proj
    assert c["norms"] == 2 * (2 * star.layers + 1) * star.hidden                  # LayerNorm weight + bias
    assert estimate(star, seq_len=2048).components["norms_biases"] == 2 * (c["norms"] + c["biases"])
    phi = param_counts(get_arch("phi-3.5-moe"))
    assert phi["biases"] == 32 * (2 * 4096 + 2 * 1024) + 32064  # q/k/v/o per layer and the lm_head bias


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_on_a_saved_model_dir_of_every_family(family, tmp_path, capsys):
    from qlora_trainer.models.tiny import model_from_config

    model_from_config(family_config(family)).save_pretrained(tmp_path)
    assert main(["memory", str(tmp_path), "--seq", "64", "--budget", "24", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "base_nf4" in d["components"] and ("experts_nf4" in d["components"]) == (family in MOE)
    assert d["total_gb"] > 0
