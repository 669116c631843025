"""Memory estimate for mixture-of-experts shapes: per-component, NF4 experts by our path, and the
24 / 48 GB verdicts for Qwen3-30B-A3B, Mixtral-8x7B and (multi-GPU) Qwen3-235B-A22B at seq 2048."""

from __future__ import annotations

import pytest

from qlora_trainer.memory.estimate import GB, estimate
from qlora_trainer.models.catalog import get_arch, param_counts


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "qwen3-235b-a22b", "qwen1.5-moe-a2.7b",
                                  "olmoe-1b-7b", "phi-3.5-moe"])
def test_experts_are_counted_in_4_bits(name):
    arch = get_arch(name)
    nf4, dense = estimate(arch, seq_len=2048), estimate(arch, seq_len=2048, quant="none")
    experts = param_counts(arch)["experts"]
    assert nf4.components["experts_nf4"] == pytest.approx(experts / 2, rel=1e-3)
    assert 0.02 < nf4.components["experts_quant_constants"] / nf4.components["experts_nf4"] < 0.04  # ~0.127 bit
    assert dense.components["experts_16bit"] == 2 * experts
    assert nf4.components["router"] == 2 * param_counts(arch)["router"]
    no_expert_lora = estimate(arch, seq_len=2048, lora_experts=False)
    extra = arch.layers * 16 * arch.experts * (2 * arch.hidden + 3 * arch.intermediate)
    assert nf4.components["lora_params"] - no_expert_lora.components["lora_params"] == 2 * extra  # bf16
    router = estimate(arch, seq_len=2048, lora_router=True)  # lora_A (16, hidden), lora_B (E, 16) per layer
    assert router.components["lora_params"] - nf4.components["lora_params"] == \
        2 * arch.layers * 16 * (arch.hidden + arch.experts)


@pytest.mark.parametrize("name, fits24, fits48", [("qwen3-30b-a3b", True, True), ("mixtral-8x7b", False, True),
                                                   ("qwen3-235b-a22b", False, False)])
def test_single_gpu_verdicts(name, fits24, fits48):
    est = estimate(get_arch(name), seq_len=2048)
    assert (est.fits(24), est.fits(48)) == (fits24, fits48), est.total_gb
    assert not estimate(get_arch(name), seq_len=2048, quant="none").fits(48)  # 16-bit experts do not


def test_235b_fits_48gb_per_gpu_with_fsdp_on_8():
    est = estimate(get_arch("qwen3-235b-a22b"), seq_len=2048, gpus=8, distributed="fsdp")
    assert est.fits(48) and not est.fits(24)
    one = estimate(get_arch("qwen3-235b-a22b"), seq_len=2048)
    assert est.components["experts_nf4"] == -(-one.components["experts_nf4"] // 8)
    assert est.total_gb < one.total_gb / 3
    assert est.device_bytes > 30 * GB


def test_moe_activations_use_the_routed_width():
    """An MoE layer's intermediate activations are experts_per_token experts wide per token."""
    arch = get_arch("mixtral-8x7b")
    short, long = (estimate(arch, seq_len=s, checkpointing=False) for s in (1024, 2048))
    per_token = (long.components["activations"] - short.components["activations"]) / 1024 / arch.layers
    assert per_token > 2 * 3 * arch.experts_per_token * arch.intermediate  # >= 3 bf16 tensors of 2 x 14336
