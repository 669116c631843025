"""LoftQ: ||W - (Q + s B A)||_F below plain NF4's ||W - NF4(W)||_F on every layer of the tiny model
(asserted per layer: one iteration < 0.95 x plain at r = 8, measured 0.89-0.93; three iterations below one); the
adapter of a LoftQ run (T = 1, base = NF4(W)) loads in PEFT with our logits (atol 1e-4, fp32); the
logits start closer to the 16-bit model's than plain NF4's; the checkpoint source hands out one
16-bit layer at a time (each is freed before the next is read); config keys are validated.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from qlora_trainer.config import Config
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora import inject_lora, save_adapter
from qlora_trainer.lora.loftq import (apply_loftq, apply_loftq_from_config, checkpoint_source, loftq_factors,
                                      nf4_like, quantization_error)
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.quantize import quantize_model
from qlora_trainer.models.tiny import random_model


def _cfg(iters: int = 1, r: int = 8) -> Config:
    cfg = Config()
    cfg.model.name_or_path, cfg.train.device = "random:tiny", "cpu"
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = r, 2.0 * r, 0.0
    cfg.lora.init, cfg.lora.loftq_iters = "loftq", iters
    return cfg.validate()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_loftq_factors_reduce_the_quantization_error():
    dense = random_model("tiny", seed=0)
    nf4 = quantize_model(random_model("tiny", seed=0), compute_dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj"):
        w, base = dense.get_submodule(name).weight.detach(), nf4.get_submodule(name)
        plain = quantization_error(w, base)
        errs = []
        for iters in (1, 3):
            q, a, b = loftq_factors(w, lambda t: nf4_like(t, base), r=8, scale=2.0, iters=iters)
            assert a.shape == (8, w.shape[1]) and b.shape == (w.shape[0], 8)
            errs.append(quantization_error(w, q, a, b, scale=2.0))
        q1, _, _ = loftq_factors(w, lambda t: nf4_like(t, base), r=8, scale=2.0, iters=1)
        assert torch.equal(q1.weight.data, base.weight.data)  # T = 1: the base is NF4(W) itself
        assert errs[0] < 0.95 * plain, (name, plain, errs)
        assert errs[1] < errs[0], (name, errs)


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_run_init_beats_plain_nf4_and_loads_in_peft(tmp_path, iters):
    peft = pytest.importorskip("peft")
    cfg = _cfg(iters)
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=260)
    inject_lora(model, cfg.lora, dtype=torch.float32)
    errors = apply_loftq_from_config(model, cfg)
    assert len(errors) == 28 and all(after < plain for plain, after in errors.values())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    dense = _logits(random_model("tiny", seed=cfg.train.seed), ids)
    plain = _logits(load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=260), ids)
    ours = _logits(model, ids)
    assert (ours - dense).norm() < 0.9 * (plain - dense).norm()
    if iters > 1:
        return  # the re-quantized base is ours only (rebuild_loftq_base); PEFT's plain NF4 base differs
    out = save_adapter(model, tmp_path / "loftq", cfg=cfg.lora, base_model="random:tiny")
    theirs = peft.PeftModel.from_pretrained(quantize_model(random_model("tiny", seed=cfg.train.seed),
                                                           compute_dtype=torch.float32), str(out))
    torch.testing.assert_close(_logits(theirs, ids), ours, atol=1e-4, rtol=1e-4)


def test_loftq_on_a_checkpoint_loaded_through_transformers(tmp_path):
    """The real loader path: a 16-bit safetensors directory loaded in NF4 by transformers'
    BitsAndBytesConfig; LoftQ reads each W back from the directory (total error 0.90 x plain)."""
    random_model("tiny", seed=0).save_pretrained(str(tmp_path / "ckpt"))
    cfg = _cfg()
    cfg.model.name_or_path = str(tmp_path / "ckpt")
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    inject_lora(model, cfg.lora, dtype=torch.float32)
    errors = apply_loftq_from_config(model, cfg)
    assert len(errors) == 28 and all(after < plain for plain, after in errors.values())
    assert sum(e[1] for e in errors.values()) < 0.95 * sum(e[0] for e in errors.values())


def test_checkpoint_source_holds_one_layer_at_a_time(tmp_path):
    random_model("tiny", seed=0).save_pretrained(str(tmp_path / "ckpt"))
    read = checkpoint_source(tmp_path / "ckpt")
    alive: list[weakref.ref] = []

    def source(name: str) -> torch.Tensor:
        assert all(ref() is None for ref in alive), "a previous 16-bit layer is still held"  # refcounting frees
        t = read(name)
        alive.append(weakref.ref(t))
        return t

    model = quantize_model(random_model("tiny", seed=0), compute_dtype=torch.float32)
    cfg = _cfg()
    inject_lora(model, cfg.lora, dtype=torch.float32)
    errors = apply_loftq(model, source, iters=1)
    assert len(alive) == len(errors) == 28


def test_loftq_config_is_validated():
    cfg = Config()
    cfg.lora.init, cfg.model.quantization = "loftq", "none"
    with pytest.raises(ConfigError, match="needs model.quantization=nf4"):
        cfg.validate()
    cfg = Config()
    cfg.lora.init, cfg.lora.loftq_iters = "loftq", 0
    with pytest.raises(ConfigError, match="lora.loftq_iters: must be >= 1"):
        cfg.validate()
