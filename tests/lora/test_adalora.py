"""AdaLoRA against PEFT's ``AdaLoraModel`` as the oracle, on the fp32 tiny model.

PEFT's initial A, B, E are copied into ours; both train 10 SGD steps on the same batches (loss +
0.5 x orthogonality penalty; init_r 6 -> target_r 2, tinit 2, tfinal 2, so steps 3-7 prune on
the cubic budget, step 8 fixes the ranks, 9 keeps them). After every step our rank pattern equals
PEFT's exactly (the same triplets pruned), and at the end E, A and B agree within atol 1e-5 (only
the summation order differs). The adapter round-trips: ours saved -> PEFT loads it -> same logits
(atol 1e-4), PEFT's saved -> our loader -> same logits. Plus: a short ``train`` run with
``lora.variant: adalora`` on the NF4 tiny model reaches the target budget and saves a PEFT-loadable
adapter, and the config keys are validated.
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora_trainer.config import AdaLoRAConfig, Config, LoRAConfig
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora import inject_lora, load_adapter, save_adapter
from qlora_trainer.lora.adalora import RankAllocator, ada_layers, orthogonal_loss
from qlora_trainer.models.tiny import random_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, TINIT, TFINAL = 10, 2, 2


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (2, 12), generator=g) for _ in range(STEPS)]


def _ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def trained():
    return _train()


def _train():
    pcfg = peft.AdaLoraConfig(init_r=6, target_r=2, tinit=TINIT, tfinal=TFINAL, deltaT=1, total_step=STEPS,
                              lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, orth_reg_weight=0.5,
                              task_type="CAUSAL_LM")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(random_model("tiny", seed=0), pcfg).train()
    ours = random_model("tiny", seed=0)
    inject_lora(ours, LoRAConfig(r=6, alpha=8, dropout=0.0, variant="adalora", adalora=AdaLoRAConfig(target_r=2)),
                dtype=torch.float32)
    layers = ada_layers(ours)
    with torch.no_grad():
        for n, layer in layers.items():
            src = theirs.base_model.model.get_submodule(n)
            for k in ("A", "B", "E"):
                getattr(layer, f"lora_{k}")["default"].copy_(getattr(src, f"lora_{k}")["default"])
    ours.train()
    alloc = RankAllocator(ours, target_r=2, total_step=STEPS, tinit=TINIT, tfinal=TFINAL)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    patterns = []
    for step, ids in enumerate(_batches()):
        theirs(input_ids=ids, labels=ids).loss.backward()
        opt_t.step()
        theirs.base_model.update_and_allocate(step)
        (ours(input_ids=ids, labels=ids).loss + 0.5 * orthogonal_loss(ours)).backward()
        opt_o.step()
        alloc.step(step)
        want = theirs.peft_config["default"].rank_pattern
        patterns.append((step, alloc.rank_pattern and dict(alloc.rank_pattern),
                         want and {k.removesuffix(".lora_E.default").removesuffix(".lora_E"): v for k, v in want.items()}))
        opt_t.zero_grad()
        opt_o.zero_grad()
    return {"ours": ours, "theirs": theirs, "alloc": alloc, "patterns": patterns}


def test_rank_patterns_match_peft_step_by_step(trained):
    pruned_steps = 0
    for step, ours, theirs in trained["patterns"]:
        assert (ours is None) == (theirs is None), step
        if ours is not None:
            assert ours == theirs, step
            pruned_steps += 1
    assert pruned_steps == STEPS - TINIT - 1  # steps 3..9 carry a pattern
    ranks = trained["alloc"].ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # budget met, unevenly
    for n, layer in ada_layers(trained["ours"]).items():
        src = trained["theirs"].base_model.model.get_submodule(n)
        for k in ("E", "A", "B"):
            torch.testing.assert_close(getattr(layer, f"lora_{k}")["default"], getattr(src, f"lora_{k}")["default"],
                                       atol=1e-5, rtol=1e-4)


def test_adalora_round_trips_with_peft(trained, tmp_path):
    ours, theirs, ids = trained["ours"], trained["theirs"], _ids()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # ten steps on random tokens barely move E: give the kept triplets visible values
        for n, layer in ada_layers(ours).items():
            e = layer.lora_E["default"]
            keep = torch.tensor(layer.rank_mask["default"]).view(-1, 1)
            e.copy_(torch.where(keep, torch.randn(e.shape, generator=g), 0.0))
            theirs.base_model.model.get_submodule(n).lora_E["default"].copy_(e)
    cfg = LoRAConfig(r=6, alpha=8, variant="adalora",
                     adalora=AdaLoRAConfig(target_r=2, tinit=TINIT, tfinal=TFINAL))
    out = save_adapter(ours, tmp_path / "ours", cfg=cfg, base_model="random:tiny")
    expected = _logits(ours, ids)
    assert (expected - _logits(random_model("tiny", seed=0), ids)).abs().max() > 1e-3  # it does something
    loaded = peft.PeftModel.from_pretrained(random_model("tiny", seed=0), str(out))
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-4, rtol=1e-4)

    theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = random_model("tiny", seed=0)
    names = load_adapter(mine, tmp_path / "theirs", dtype=torch.float32)
    assert len(names) == sum(r > 0 for r in trained["alloc"].ranks().values())  # rank-0 layers add nothing
    torch.testing.assert_close(_logits(mine, ids), _logits(theirs, ids), atol=1e-4, rtol=1e-4)


def test_train_with_adalora_reaches_the_budget(tmp_path):
    from qlora_trainer.lora.peft_format import read_adapter_config
    from qlora_trainer.train import train

    result = train(_adalora_run_cfg(tmp_path))
    config = read_adapter_config(result.adapter_dir)
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 5
    kept = sum(sum(mask) for mask in config["rank_pattern"].values())
    assert kept == 2 * len(config["rank_pattern"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranks = [r["adalora_ranks"] for r in rows if "adalora_ranks" in r]
    assert len(ranks) == 1 and sum(ranks[0].values()) == kept  # the allocation, logged per layer
    assert [r["adalora_budget"] for r in rows if "adalora_budget" in r][-1] == kept


def test_adalora_run_resumes_after_the_final_allocation(tmp_path):
    """A run stopped after the ranks are fixed resumes with the same ranks (pruned E's stay 0)."""
    from qlora_trainer.lora.peft_format import read_adapter_config
    from qlora_trainer.train import train

    cfg = _adalora_run_cfg(tmp_path)
    cfg.train.save_every, cfg.train.max_steps, cfg.lora.adalora.tfinal = 1, 6, 2
    train(cfg, stop_after=5)  # the ranks are fixed at step index T - tfinal = 4
    cfg.resume = "auto"
    result = train(cfg)
    assert result.step == 6
    pattern = read_adapter_config(result.adapter_dir)["rank_pattern"]
    assert sum(sum(m) for m in pattern.values()) == 2 * len(pattern)


def _adalora_run_cfg(tmp_path) -> Config:
    cfg = Config()
    cfg.model.name_or_path, cfg.train.device, cfg.output_dir = "random:tiny", "cpu", str(tmp_path / "run")
    cfg.lora = LoRAConfig(r=4, alpha=8, dropout=0.0, variant="adalora",
                          adalora=AdaLoRAConfig(target_r=2, tinit=1, tfinal=1))
    cfg.train.max_steps, cfg.train.batch_size, cfg.data.seq_len, cfg.data.max_samples = 5, 2, 32, 20
    cfg.output.progress_bar, cfg.train.grad_accum = False, 1
    return cfg.validate()


def test_adalora_layer_merges_and_deletes():
    """merge_lora of an AdaLoRA model equals its forward (fp32 atol 1e-5); deleting the adapter
    leaves no AdaLoRA tensors."""
    from qlora_trainer.lora import delete_adapter, merge_lora

    model = random_model("tiny", seed=0).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8, variant="adalora", adalora=AdaLoRAConfig(target_r=2)),
                dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in ada_layers(model).values():
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=g))
    ids = _ids()
    adapted = _logits(model, ids)
    assert (adapted - _logits(random_model("tiny", seed=0), ids)).abs().max() > 1e-3
    other = random_model("tiny", seed=0)
    inject_lora(other, LoRAConfig(r=4, alpha=8, variant="adalora", adalora=AdaLoRAConfig(target_r=2)),
                dtype=torch.float32)
    delete_adapter(other, "default")
    assert not ada_layers(other) and not any("lora_E" in n for n, _ in other.named_parameters())
    merge_lora(model)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_adalora_layers_in_grouped_projections():
    """``adapt_model`` (q/k/v and gate/up as one grouped matmul) computes AdaLoRA layers as they
    compute alone: logits and the grads of A, E, B within 1e-5 (fp32)."""
    from qlora_trainer.models.adapt import adapt_model

    def build(adapted: bool):
        model = random_model("tiny", seed=0)
        torch.manual_seed(0)  # A and B start from the global generator
        inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, variant="adalora", adalora=AdaLoRAConfig(target_r=2)),
                    dtype=torch.float32)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for layer in ada_layers(model).values():
                layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=g))
        if adapted:
            adapt_model(model, "torch", group_projections=True)
        return model.train()

    ids = _ids()
    outs = []
    for adapted in (False, True):
        model = build(adapted)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        layer = ada_layers(model)["model.layers.1.self_attn.k_proj"]
        outs.append((logits.detach(), *(getattr(layer, f"lora_{k}")["default"].grad for k in "AEB")))
    for plain, grouped in zip(*outs):
        torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-4)


def test_adalora_config_is_validated():
    cfg = Config()
    cfg.lora.variant, cfg.lora.r, cfg.lora.adalora.target_r = "adalora", 4, 8
    with pytest.raises(ConfigError, match="lora.adalora.target_r: must be <= lora.r"):
        cfg.validate()
    cfg.lora.adalora.target_r, cfg.lora.adalora.tinit, cfg.train.max_steps = 2, 5, 6
    cfg.lora.adalora.tfinal = 1
    with pytest.raises(ConfigError, match="leave no budget phase"):
        cfg.validate()
    cfg.lora.adalora.tinit, cfg.lora.adalora.beta1 = 0, 1.0
    with pytest.raises(ConfigError, match=r"lora.adalora.beta1: must be in \(0, 1\)"):
        cfg.validate()


def test_adalora_settings_are_a_nested_section(tmp_path):
    from qlora_trainer.config import apply_override, config_from_dict, field_docs, load_config, save_config

    cfg = config_from_dict({"lora": {"variant": "adalora", "r": 8, "adalora": {"target_r": 2, "tinit": 3}}})
    apply_override(cfg, "lora.adalora.beta1=0.5")
    assert (cfg.lora.adalora.target_r, cfg.lora.adalora.tinit, cfg.lora.adalora.beta1) == (2, 3, 0.5)
    save_config(cfg.validate(), tmp_path / "config.yaml")  # what a run saves reloads as it was
    assert load_config(tmp_path / "config.yaml", ours=True) == cfg
    assert "lora.adalora.orth_reg_weight" in field_docs()
    from qlora_trainer.train.resume import config_changes
    from qlora_trainer.train.trackers import flat_config

    cfg.lora.adalora.tinit = 1  # a nested key is one key of resume's change list and of the trackers' config
    assert config_changes(cfg, tmp_path) == ["lora.adalora.tinit: 3 -> 1"]
    assert flat_config(cfg)["lora.adalora.target_r"] == 2
    with pytest.raises(ConfigError, match=r"^command line: lora.adalora_target_r is now lora.adalora.target_r; "
                                          r"rename it there$"):
        apply_override(cfg, "lora.adalora_target_r=2")
    with pytest.raises(ConfigError, match=r"^config: lora.adalora_tinit is now lora.adalora.tinit"):
        config_from_dict({"lora": {"adalora_tinit": 1}})
    with pytest.raises(ConfigError, match=r"unknown key 'lora.adalora.target'; did you mean 'lora.adalora.target_r'"):
        apply_override(cfg, "lora.adalora.target=2")
    with pytest.raises(ConfigError, match=r"lora.adalora: must be a mapping of keys"):
        config_from_dict({"lora": {"adalora": 4}})
