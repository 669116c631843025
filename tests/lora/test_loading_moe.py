"""Loading adapters on mixture-of-experts weights for generation: they cannot share a hot-swap slot
(their tensors are per expert), so a hot-swap load falls back to side by side with the same logits."""

from __future__ import annotations

import logging

import torch

from qlora_trainer.config import Config
from qlora_trainer.lora import save_adapter
from qlora_trainer.lora.loading import load_with_adapters
from qlora_trainer.models.families import family_config
from qlora_trainer.models.tiny import byte_tokenizer, model_from_config
from qlora_trainer.train.setup import prepare_model


def test_hotswap_load_of_an_expert_adapter_falls_back_to_side_by_side(tmp_path, caplog):
    base_dir = tmp_path / "mixtral"
    hf = family_config("mixtral")
    hf.vocab_size = len(byte_tokenizer())
    model_from_config(hf, seed=0).save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    cfg = Config()
    cfg.model.name_or_path = str(base_dir)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 2, 4.0, 0.0
    model = model_from_config(hf, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model(model, cfg, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    adapter = save_adapter(model, tmp_path / "adapter", cfg=cfg.lora, base_model=str(base_dir))
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    side = load_with_adapters([adapter], device="cpu", hotswap=False)
    with caplog.at_level(logging.INFO, logger="qlora_trainer.lora.loading"):
        swapped = load_with_adapters([adapter], device="cpu", hotswap=True)
    assert "cannot share a hot-swap slot: loaded side by side" in caplog.text and not swapped.swaps
    with torch.no_grad():
        got, want = swapped.model(ids).logits, side.model(ids).logits
        base = load_with_adapters([], base=str(base_dir), device="cpu").model(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the expert adapter is active
