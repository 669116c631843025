"""Catalog shapes against published parameter counts; HF config parsing and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.errors import ConfigError
from qlora_trainer.models.catalog import CATALOG, arch_from_hf_config, get_arch, param_counts

# Published totals (model cards / summing the safetensors shapes).
PUBLISHED = {
    "llama-7b": 6_738_415_616, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192, "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name,total", sorted(PUBLISHED.items()))
def test_param_counts_match_published(name, total):
    assert param_counts(get_arch(name))["total"] == total


def test_catalog_covers_issue_models():
    wanted = ["llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
              "llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
              "qwen2.5-72b", "tiny"]
    assert set(wanted) <= set(CATALOG)


@pytest.mark.parametrize("name", ["qwen2.5-7b", "llama-3.2-1b", "llama-2-70b"])
def test_hf_model_on_meta_has_catalog_param_count(name):
    """The transformers model built from to_hf_config has exactly param_counts' total (biases, tying)."""
    from transformers import AutoModelForCausalLM

    arch = get_arch(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.to_hf_config())
    assert sum(p.numel() for p in model.parameters()) == param_counts(arch)["total"]


def test_arch_from_hf_config_dir_file_and_dict(tmp_path):
    arch = get_arch("qwen2.5-14b")
    raw = arch.to_hf_config().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for src in (tmp_path, tmp_path / "config.json", raw):
        got = arch_from_hf_config(src)
        assert (got.hidden, got.intermediate, got.layers, got.heads, got.kv_heads, got.vocab, got.tied, got.family) \
            == (5120, 13824, 48, 40, 8, 152064, False, "qwen2")
        assert param_counts(got) == param_counts(arch)


def test_arch_from_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        arch_from_hf_config(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text('{\n "hidden_size": 8,\n oops}')
    with pytest.raises(ConfigError, match=r"line 3: invalid JSON"):
        arch_from_hf_config(bad)
    with pytest.raises(ConfigError, match="missing key 'intermediate_size'"):
        arch_from_hf_config({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2})
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        arch_from_hf_config({"model_type": "gpt2"})


def test_get_arch_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'llama-2-70b'"):
        get_arch("llama2-70b")
