"""PEFT format both ways: our save -> ``peft.PeftModel.from_pretrained`` -> same logits, and PEFT's
``save_pretrained`` -> our ``load_adapter`` -> same logits, for LoRA, rsLoRA and DoRA on the fp32 tiny
model and on its NF4 version. Tolerance: logits atol 1e-4 (fp32; only the summation order differs).
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import LoRAConfig
from qlora_trainer.errors import QloraError
from qlora_trainer.lora import inject_lora, load_adapter, lora_layers, save_adapter
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import random_model

peft = pytest.importorskip("peft")

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _base(nf4: bool):
    """``tiny-64`` (tiny with intermediate 384): PEFT's DoRA dequantizes NF4 through bitsandbytes,
    whose AVX512F CPU kernel is wrong when in_features is not a multiple of the block size
    (docs/bitsandbytes-cpu.md), so the oracle gets a shape that kernel handles."""
    model = random_model("tiny-64", seed=0)
    if nf4:
        model = quantize_model(model, compute_dtype=torch.float32)
    return model.eval()


def _randomize(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            for p in layer.lora_magnitude_vector.values():
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def _ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_save_loads_in_peft(tmp_path, variant, nf4):
    ours = _base(nf4)
    inject_lora(ours, LoRAConfig(r=4, alpha=8, variant=variant, dropout=0.0), dtype=torch.float32)
    _randomize(ours)
    out = save_adapter(ours, tmp_path / "adapter", cfg=LoRAConfig(r=4, alpha=8, variant=variant),
                       base_model="random:tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] == (variant == "dora") and config["use_rslora"] == (variant == "rslora")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.layers.3.mlp.down_proj.lora_magnitude_vector" in keys) == (variant == "dora")

    theirs = peft.PeftModel.from_pretrained(_base(nf4), str(out)).eval()
    ids = _ids()
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
        with theirs.disable_adapter():
            base = theirs(ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_save_loads_in_ours(tmp_path, variant, nf4):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                          task_type="CAUSAL_LM", **VARIANTS[variant])
    theirs = peft.get_peft_model(_base(nf4), cfg).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = _base(nf4)
    names = load_adapter(ours, tmp_path / "p", dtype=torch.float32)
    assert len(names) == 28
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in ours.parameters())


def test_save_into_existing_dir_keeps_other_files(tmp_path, tiny_model, tokenizer):
    inject_lora(tiny_model, LoRAConfig(r=2, targets=["q_proj"]), dtype=torch.float32)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    save_adapter(tiny_model, tmp_path, cfg=LoRAConfig(r=2), base_model="random:tiny", tokenizer=tokenizer)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    assert (tmp_path / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_errors_are_one_line(tmp_path, tiny_model):
    with pytest.raises(QloraError, match="no adapter_config.json"):
        load_adapter(tiny_model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(QloraError, match="safetensors only"):
        load_adapter(tiny_model, tmp_path)
    other = random_model("tiny", seed=1)
    inject_lora(other, LoRAConfig(r=2, targets=["q_proj"]), dtype=torch.float32)
    save_adapter(other, tmp_path / "a", cfg=LoRAConfig(r=2), base_model="random:tiny")
    bigger = torch.nn.Module()
    with pytest.raises(QloraError, match="not in the model"):
        load_adapter(bigger, tmp_path / "a", dtype=torch.float32)


def test_partial_targets_saved_as_regex_peft_loads(tmp_path):
    ours = _base(False)
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, targets=[r"model\.layers\.1\.self_attn\.q_proj", "v_proj"])
    names = inject_lora(ours, cfg, dtype=torch.float32)
    _randomize(ours)
    save_adapter(ours, tmp_path, cfg=cfg, base_model="random:tiny")
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str)  # q_proj of one layer only: a regex PEFT full-matches
    theirs = peft.PeftModel.from_pretrained(_base(False), str(tmp_path)).eval()
    assert sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == sorted(names)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_lowest_tested_peft_loads_moe_adapters():
    """The lowest PEFT we test (pyproject's ``test`` extra, ci/constraints-lowest.txt, equal) loads
    adapters on MoE experts and routers (``PEFT_FOR_MOE``), so their parity tests run in both legs."""
    import re
    from pathlib import Path

    from packaging.version import Version

    from qlora_trainer.lora.peft_format import PEFT_FOR_MOE

    root = Path(__file__).resolve().parents[2]
    lower = re.search(r'"peft>=([0-9.]+)', (root / "pyproject.toml").read_text())
    pinned = re.search(r"^peft==([0-9.]+)", (root / "ci" / "constraints-lowest.txt").read_text(), re.M)
    assert lower and pinned
    assert Version(pinned[1]) == Version(lower[1]) >= Version(PEFT_FOR_MOE)
    assert Version(peft.__version__) >= Version(PEFT_FOR_MOE)


def test_moe_adapter_names_no_bare_transformers4_expert_projection(tmp_path):
    """On a model with fused experts, PEFT >= 0.22 takes bare ``gate_proj`` / ``up_proj`` (or a regex) in
    ``target_modules`` for a transformers-4 expert adapter and resizes the fused experts' adapter: Qwen2-MoE's
    shared expert is named by two components instead."""
    from qlora_trainer.config import Config
    from qlora_trainer.models.families import family_config
    from qlora_trainer.models.tiny import model_from_config
    from qlora_trainer.train.setup import prepare_model

    cfg = Config()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 2, 4.0, 0.0
    model = model_from_config(family_config("qwen2_moe"), seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model(model, cfg, device=torch.device("cpu"), dtype=torch.float32)
    out = save_adapter(model, tmp_path / "a", cfg=cfg.lora, base_model="random:qwen2_moe")
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, list) and "shared_expert.gate_proj" in targets
    assert not {"gate_proj", "up_proj", "down_proj", "gate"} & set(targets)
