"""Catalog entries of the families beyond Llama: the transformers model built from each entry's
config has exactly the catalog's parameter count (norm layouts, q/k norms, fused projections,
biases, experts, shared experts), which equals the published total where we quote it; configs
round-trip, and a saved model directory of every family of the family matrix reads back exactly."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.models.catalog import CATALOG, arch_from_hf_config, get_arch, linear_shapes, param_counts
from qlora_trainer.models.families import FAMILIES, MOE, family_config
from qlora_trainer.models.family_layout import FAMILY_LAYOUTS

# published totals (model cards / summed safetensors shapes)
PUBLISHED = {"phi-3-mini": 3_821_079_552, "mixtral-8x7b": 46_702_792_704, "gemma-2-9b": 9_241_705_984,
             "gemma-3-1b": 999_885_952, "gemma-7b": 8_537_680_896, "granite-3.3-8b": 8_170_864_640,
             "olmo-3-7b": 7_298_011_136, "smollm3-3b": 3_075_098_624, "glm-4-9b": 9_400_279_040,
             "qwen1.5-moe-a2.7b": 14_315_784_192, "olmoe-1b-7b": 6_919_161_856,
             "granite-3.1-3b-a800m": 3_298_793_472}
NEW = ["qwen3-0.6b", "qwen3-8b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini", "phi-4", "olmo-2-7b", "mixtral-8x7b",
       "qwen3-30b-a3b", "qwen3-235b-a22b", "gemma-7b", "granite-3.3-8b", "olmo-3-7b", "smollm3-3b", "glm-4-9b",
       "command-r-35b", "starcoder2-15b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "phi-3.5-moe",
       "granite-3.1-3b-a800m"]


def _meta_param_count(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NEW)
def test_hf_model_on_meta_has_catalog_param_count(name):
    arch = get_arch(name)
    assert _meta_param_count(arch.to_hf_config()) == param_counts(arch)["total"]
    assert param_counts(arch_from_hf_config(arch.to_hf_config().to_dict())) == param_counts(arch)


@pytest.mark.parametrize("name, total", sorted(PUBLISHED.items()))
def test_published_totals(name, total):
    assert param_counts(get_arch(name))["total"] == total


def test_moe_entries():
    for name, total_b, active in [("qwen3-30b-a3b", 30.5, 8), ("qwen3-235b-a22b", 235.1, 8), ("mixtral-8x7b", 46.7, 2),
                                  ("phi-3.5-moe", 41.9, 2), ("olmoe-1b-7b", 6.9, 8), ("qwen1.5-moe-a2.7b", 14.3, 4)]:
        arch = CATALOG[name]
        assert arch.is_moe and arch.experts_per_token == active
        assert param_counts(arch)["total"] / 1e9 == pytest.approx(total_b, abs=0.1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_family_model_dir_reads_back_exactly(family, tmp_path):
    """``save_pretrained`` of the family matrix's tiny model: the directory's config.json gives the
    model's exact parameter count, and the family, experts and tying it was built with."""
    from qlora_trainer.models.tiny import model_from_config

    cfg = family_config(family)
    model = model_from_config(cfg)
    model.save_pretrained(tmp_path)
    arch = arch_from_hf_config(tmp_path)
    assert param_counts(arch)["total"] == sum(p.numel() for p in model.parameters())
    assert arch.is_moe == (family in MOE) and arch.tied == cfg.tie_word_embeddings
    assert arch.layout is FAMILY_LAYOUTS[family]


def test_a_config_without_the_optional_keys_takes_the_class_defaults():
    """Keys left out of a config.json mean the transformers class default: StarCoder2 and Cohere
    tie their embeddings, StarCoder2's linears and GLM-4's q/k/v carry biases, Gemma's heads are 256 wide."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    star, cohere, glm, gemma = (arch_from_hf_config({**base, "model_type": t})
                                for t in ("starcoder2", "cohere", "glm4", "gemma"))
    assert star.tied and cohere.tied and gemma.tied and not glm.tied
    assert all(b for _, _, _, b in linear_shapes(star))
    assert [n for n, _, _, b in linear_shapes(glm) if b] == ["q_proj", "k_proj", "v_proj"]
    assert gemma.head_dim == 256


@pytest.mark.parametrize("family", list(FAMILY_LAYOUTS))
def test_layout_defaults_are_the_transformers_class_defaults(family):
    import transformers

    lay = FAMILY_LAYOUTS[family]
    cls = getattr(transformers, lay.config)
    default = cls().to_dict()
    assert default["tie_word_embeddings"] == lay.tied_default
    assert lay.eps_key in default
    if lay.bias_key:
        assert default[lay.bias_key] == lay.bias_default
    narrow = cls(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert (getattr(narrow, "head_dim", None) or 16) == (lay.head_dim_default or 16)


def test_qwen2_moe_shared_expert_and_its_gate_are_linear_layers():
    arch = get_arch("qwen1.5-moe-a2.7b")
    names = [n for n, *_ in linear_shapes(arch)]
    assert names[4:] == ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                         "shared_expert_gate"]
    c = param_counts(arch)
    assert c["router"] == 60 * 2048 * 24 and c["experts"] == 24 * 60 * 3 * 2048 * 1408


def test_moe_config_with_dense_layers_is_refused():
    from qlora_trainer.errors import ConfigError

    cfg = get_arch("qwen1.5-moe-a2.7b").to_hf_config().to_dict() | {"mlp_only_layers": [0]}
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("family, switches", [
    ("llama", dict(bias=True, mlp_bias=True)), ("granite", dict(bias=True)), ("cohere", dict(qk_norm=True)),
    ("cohere", dict(bias=True, tied=False)), ("starcoder2", dict(bias=False)), ("glm4", dict(bias=False)),
    ("qwen2_moe", dict(bias=False)), ("phimoe", dict(bias=True, lm_head_bias=True, tied=True)),
    ("olmoe", dict(bias=True)), ("smollm3", dict(mlp_bias=True, tied=False))])
def test_optional_biases_and_norms_are_counted_exactly(family, switches):
    """The configs' optional parts (attention / MLP / lm_head biases, Cohere's q/k norms, tying) on
    small shapes: the transformers model has exactly the counted parameters, and the config reads back."""
    import dataclasses

    moe = dict(experts=4, experts_per_token=2) if family in MOE else {}
    shared = dict(shared_intermediate=96) if family == "qwen2_moe" else {}
    arch = dataclasses.replace(get_arch("tiny"), family=family, vocab=160_000, **moe, **shared, **switches)
    assert _meta_param_count(arch.to_hf_config()) == param_counts(arch)["total"]
    assert param_counts(arch_from_hf_config(arch.to_hf_config().to_dict())) == param_counts(arch)
