"""The memory report's load line for mixture-of-experts models in NF4 (quantized while loading,
models/moe_load.py): the NF4 weights plus one expert's 16-bit gate_up_proj and one tensor's fp32
scales, well under the training peak and the 16-bit experts."""

from __future__ import annotations

import re

import pytest

from qlora_trainer.memory.estimate import GIB, estimate
from qlora_trainer.models.catalog import get_arch, param_counts


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_load_peak_note(name):
    arch = get_arch(name)
    est = estimate(arch, seq_len=2048)
    (note,) = [n for n in est.notes if n.startswith("loading peaks near")]
    peak, transient, dense = (float(x) for x in re.findall(r"([\d.]+) GiB", note))
    weights = sum(est.components[k] for k in ("base_nf4", "quant_constants", "experts_nf4", "experts_quant_constants",
                                               "router", "embeddings", "lm_head", "norms_biases")) / GIB
    gate_up = 2 * arch.intermediate * arch.hidden
    assert peak == pytest.approx(weights + transient, abs=0.01)
    assert transient == pytest.approx((2 * gate_up + 4 * arch.experts * gate_up / 64) / GIB, abs=0.01)
    assert dense == pytest.approx(2 * param_counts(arch)["experts"] / GIB, abs=0.1)
    assert peak < est.allocated_bytes / GIB < dense


def test_no_load_note_for_dense_16bit_or_multi_gpu():
    assert not any(n.startswith("loading") for n in estimate(get_arch("llama-3-8b"), seq_len=512).notes)
    assert not any(n.startswith("loading") for n in estimate(get_arch("mixtral-8x7b"), seq_len=512, quant="none").notes)
    fsdp = estimate(get_arch("qwen3-235b-a22b"), seq_len=512, gpus=8, distributed="fsdp")
    assert not any(n.startswith("loading") for n in fsdp.notes)
