"""``performance.embeddings_on_cpu``: the CpuEmbedding wrapper changes no logits, gradients or state-dict
keys, skips tied / trainable tables with a warning, is applied by prepare_model, and the estimate
moves the table's bytes to host memory. Comparisons are exact: the lookup is the same gather."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from qlora_trainer.config import LoRAConfig, config_from_dict, load_config
from qlora_trainer.errors import ConfigError
from qlora_trainer.lora import inject_lora
from qlora_trainer.lora.peft_format import adapter_state_dict
from qlora_trainer.models.catalog import get_arch
from qlora_trainer.models.cpu_embedding import CpuEmbedding, apply_cpu_embeddings
from qlora_trainer.models.tiny import random_model

IDS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny_model(tiny_model):
    """The shared tiny fp32 Llama, frozen like a loaded base model."""
    return tiny_model.requires_grad_(False)


def _wrapped(model):
    m = copy.deepcopy(model)
    assert apply_cpu_embeddings(m) == 260 * 128 * 4   # tiny: vocab 260 x hidden 128, fp32
    return m


def test_logits_and_generate_unchanged(tiny_model):
    m = _wrapped(tiny_model)
    emb = m.get_input_embeddings()
    assert isinstance(emb, CpuEmbedding) and emb.weight.device.type == "cpu"
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (260, 128, 259)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, tiny_model(IDS).logits)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=259, eos_token_id=258)
    assert torch.equal(m.generate(IDS[:1], **kw), tiny_model.generate(IDS[:1], **kw))
    # re-registered last: the first parameter (PreTrainedModel.device, where generate moves inputs)
    # is a decoder weight, not the CPU table
    assert next(m.parameters()) is not emb.weight


def test_gradients_and_state_dict_keys(tiny_model):
    base = tiny_model.train()
    inject_lora(base, LoRAConfig(r=4, alpha=8.0, dropout=0.0), dtype=torch.float32, backend="torch")
    wrapped = _wrapped(base)
    grads = []
    for m in (base, wrapped):
        m(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)
    assert set(base.state_dict()) == set(wrapped.state_dict())
    assert adapter_state_dict(base).keys() == adapter_state_dict(wrapped).keys()


def test_idempotent_and_dtype_cast_stays_on_cpu(tiny_model):
    m = _wrapped(tiny_model)
    assert apply_cpu_embeddings(m) == 0
    m.to(torch.float64)
    w = m.get_input_embeddings().weight
    assert w.dtype == torch.float64 and w.device.type == "cpu" and not w.requires_grad


def test_tied_or_trainable_tables_stay_with_a_warning(tiny_model, caplog):
    tied = random_model(dataclasses.replace(get_arch("tiny"), tied=True))
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    tiny_model.get_input_embeddings().weight.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.models.cpu_embedding"):
        assert apply_cpu_embeddings(tied) == 0 and apply_cpu_embeddings(tiny_model) == 0
    assert type(tied.get_input_embeddings()) is torch.nn.Embedding
    assert type(tiny_model.get_input_embeddings()) is torch.nn.Embedding
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "tied" in msgs[0] and "trainable" in msgs[1]


def test_prepare_model_applies_the_config_flag():
    from qlora_trainer.models.load import load_base_model
    from qlora_trainer.train.setup import prepare_model

    cfg = config_from_dict({"model": {"name_or_path": "random:tiny", "quantization": "none"},
                            "performance": {"embeddings_on_cpu": True}, "lora": {"r": 4}}).validate()
    cpu = torch.device("cpu")
    model = prepare_model(load_base_model(cfg, device=cpu, dtype=torch.float32), cfg, device=cpu,
                          dtype=torch.float32)
    assert isinstance(model.get_input_embeddings(), CpuEmbedding)
    model(IDS, labels=IDS).loss.backward()


def test_config_bad_type_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["performance.embeddings_on_cpu=sometimes"])
    msg = str(e.value)
    assert "performance.embeddings_on_cpu" in msg and "\n" not in msg


def test_estimate_for_config_moves_the_table_to_host():
    from qlora_trainer.memory.estimate import estimate_for_config

    cfg = config_from_dict({"model": {"name_or_path": "llama-3.1-70b"}, "data": {"seq_len": 1024}})
    off = estimate_for_config(cfg)
    cfg.performance.embeddings_on_cpu = True
    on = estimate_for_config(cfg)
    table = 128256 * 8192 * 2
    assert off.components["embeddings"] == table and on.components["embeddings"] == 0
    assert on.host_bytes - off.host_bytes == table


@pytest.mark.gpu
def test_cuda_lookup_matches_and_model_device_stays_cuda(tiny_model):
    cuda = torch.device("cuda")
    ref = tiny_model.to(cuda)
    m = _wrapped(ref)
    w = m.get_input_embeddings().weight
    assert w.device.type == "cpu" and w.is_pinned() and m.device.type == "cuda"
    ids = IDS.to(cuda)
    with torch.no_grad():
        assert torch.equal(m.get_input_embeddings()(ids), ref.get_input_embeddings()(ids))
        torch.testing.assert_close(m(ids).logits, ref(ids).logits)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=259, eos_token_id=258)
    assert torch.equal(m.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))
    m.to(cuda)
    assert m.get_input_embeddings().weight.device.type == "cpu"
