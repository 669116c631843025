"""Catalog entries of the families beyond Llama: the transformers model built from each entry's
config has exactly the catalog's parameter count (norm layouts, q/k norms, fused projections,
experts), which equals the published total where we quote it; configs round-trip."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.models.catalog import CATALOG, arch_from_hf_config, get_arch, param_counts

# published totals (model cards / summed safetensors shapes)
PUBLISHED = {"phi-3-mini": 3_821_079_552, "mixtral-8x7b": 46_702_792_704, "gemma-2-9b": 9_241_705_984,
             "gemma-3-1b": 999_885_952}
NEW = ["qwen3-0.6b", "qwen3-8b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini", "phi-4", "olmo-2-7b", "mixtral-8x7b",
       "qwen3-30b-a3b", "qwen3-235b-a22b"]


@pytest.mark.parametrize("name", NEW)
def test_hf_model_on_meta_has_catalog_param_count(name):
    from transformers import AutoModelForCausalLM

    arch = get_arch(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.to_hf_config())
    assert sum(p.numel() for p in model.parameters()) == param_counts(arch)["total"]
    assert param_counts(arch_from_hf_config(arch.to_hf_config().to_dict())) == param_counts(arch)


@pytest.mark.parametrize("name, total", sorted(PUBLISHED.items()))
def test_published_totals(name, total):
    assert param_counts(get_arch(name))["total"] == total


def test_moe_entries():
    for name, total_b, active in [("qwen3-30b-a3b", 30.5, 8), ("qwen3-235b-a22b", 235.1, 8), ("mixtral-8x7b", 46.7, 2)]:
        arch = CATALOG[name]
        assert arch.is_moe and arch.experts_per_token == active
        assert param_counts(arch)["total"] / 1e9 == pytest.approx(total_b, abs=0.1)
