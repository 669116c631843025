"""Added marker tokens (``data.marker_tokens: add``): only their rows train, they are saved in PEFT's
``trainable_token_indices`` format (PEFT loads the adapter and gives our logits), and the memory
estimate counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_trainer.config import config_from_dict
from qlora_trainer.lora.tokens import TrainableTokens


def _chat_cfg(tmp_path, **model):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict({
        "model": {"name_or_path": "random:tiny", "quantization": "none", "resize_embeddings": True, **model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data), "format": "chat", "chat_template": "chatml", "marker_tokens": "add",
                 "seq_len": 64},
        "train": {"max_steps": 3, "lr": 1e-2, "batch_size": 2, "grad_accum": 1, "seed": 0, "device": "cpu",
                  "optimizer": "adamw"},
        "output": {"progress_bar": False},
        "output_dir": str(tmp_path / "run"),
    }).validate()


def test_trainable_tokens_embedding_and_head_replace_only_their_rows():
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    te, th = TrainableTokens(emb, [7, 3]), TrainableTokens(head, [7, 3])
    with torch.no_grad():
        te.trainable_tokens_delta.add_(1.0)
        th.trainable_tokens_delta.add_(1.0)
    x = torch.tensor([[1, 3, 7, 9]])
    w = emb.weight.detach().clone()
    w[[3, 7]] += 1.0
    torch.testing.assert_close(te(x), torch.nn.functional.embedding(x, w))
    h = torch.randn(2, 5, 4)
    wh = head.weight.detach().clone()
    wh[[3, 7]] += 1.0
    torch.testing.assert_close(th(h), h @ wh.T)
    torch.testing.assert_close(th.weight, wh)


def test_added_tokens_train_and_load_in_peft_and_ours(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    from qlora_trainer.models.tiny import random_model
    from qlora_trainer.train import train

    cfg = _chat_cfg(tmp_path)
    res = train(cfg)
    adapter = Path(res.adapter_dir)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["trainable_token_indices"] == {"embed_tokens": [260, 261], "lm_head": [260, 261]}
    from safetensors.torch import load_file

    sd = load_file(str(adapter / "adapter_model.safetensors"))
    emb_key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    head_key = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    assert sd[emb_key].shape == sd[head_key].shape == (2, 128)
    # the rows trained: they moved away from the random initial rows of the same seeded base
    import dataclasses

    from qlora_trainer.models.catalog import get_arch

    base = random_model(dataclasses.replace(get_arch("tiny"), vocab=262), seed=0)
    assert not torch.allclose(sd[emb_key], base.model.embed_tokens.weight[260:262], atol=1e-4)
    assert not torch.allclose(sd[head_key], base.lm_head.weight[260:262], atol=1e-4)

    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    from qlora_trainer.lora.loading import load_with_adapters

    loaded = load_with_adapters([adapter], device="cpu")  # our loader: saved tokenizer (262 tokens) + rows
    assert len(loaded.tokenizer) == 262 and loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 261
    ours = loaded.model
    x = torch.tensor([[260, 117, 115, 101, 114, 10, 97, 261, 10, 260]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        torch.testing.assert_close(want, ours(input_ids=x).logits, atol=1e-4, rtol=1e-4)
        from qlora_trainer.lora import merge_lora

        merged = merge_lora(ours)  # rows written into plain embedding / lm_head tables
        assert type(merged.model.embed_tokens) is torch.nn.Embedding and type(merged.lm_head) is torch.nn.Linear
        torch.testing.assert_close(want, merged(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_estimate_counts_added_token_rows(tmp_path):
    from qlora_trainer.memory import estimate_for_config

    cfg = _chat_cfg(tmp_path)
    with_rows = estimate_for_config(cfg)
    cfg.data.marker_tokens = "split"
    without = estimate_for_config(cfg)
    assert with_rows.settings["new_tokens"] == 2 and without.settings["new_tokens"] == 0
    assert with_rows.components["token_rows"] > 0 and "token_rows" not in without.components
    assert with_rows.components["embeddings"] - without.components["embeddings"] == 2 * 128 * 2  # 2 bf16 rows
    assert with_rows.total_gb > without.total_gb


def test_tied_embeddings_share_one_row_parameter_saved_once():
    import dataclasses

    from qlora_trainer.lora.tokens import make_tokens_trainable, peft_token_entries
    from qlora_trainer.models.catalog import get_arch
    from qlora_trainer.models.tiny import random_model

    model = random_model(dataclasses.replace(get_arch("tiny"), tied=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # make_tokens_trainable freezes the table itself
    make_tokens_trainable(model, [5, 9])
    assert model.lm_head.trainable_tokens_delta is model.model.embed_tokens.trainable_tokens_delta
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 128
    tensors, indices = peft_token_entries(model, "base_model.model.")
    assert indices == [5, 9]  # a list targets the input embedding; PEFT ties the output layer to it
    assert list(tensors) == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]


def test_resume_with_added_token_rows_is_exact(tmp_path):
    from qlora_trainer.train import train

    whole = train(_chat_cfg(tmp_path / "a"))
    cfg = _chat_cfg(tmp_path / "b")
    first = train(cfg, stop_after=2)
    cfg.resume = "auto"
    rest = train(cfg)  # the token rows come back from the checkpoint's adapter file
    assert rest.resumed_from is not None and first.losses + rest.losses == whole.losses
