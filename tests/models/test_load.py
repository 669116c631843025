"""load_tokenizer / load_base_model: NF4 via module replacement or BitsAndBytesConfig, frozen, no fp32
upcast of embeddings / lm_head, pad-token reuse, one-line errors for missing models."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.config import config_from_dict
from qlora_trainer.errors import QloraError
from qlora_trainer.models.load import load_base_model, load_tokenizer
from qlora_trainer.models.quantize import is_4bit, quantize_model

CPU = torch.device("cpu")


def _n4bit(model) -> int:
    return sum(is_4bit(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_nf4_is_frozen_and_not_upcast(dtype):
    cfg = config_from_dict({"model": {"name_or_path": "random:tiny"}})
    model = load_base_model(cfg, device=CPU, dtype=dtype)
    assert _n4bit(model) == 28 and not is_4bit(model.lm_head)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.dtype == dtype and model.get_input_embeddings().weight.dtype == dtype
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == dtype


def test_random_model_takes_the_tokenizer_vocab():
    cfg = config_from_dict({"model": {"name_or_path": "random:tiny", "quantization": "none"}})
    model = load_base_model(cfg, device=CPU, dtype=torch.float32, vocab_size=300)
    assert _n4bit(model) == 0
    assert model.get_input_embeddings().weight.shape[0] == 300 == model.lm_head.weight.shape[0]


def test_local_directory_loads_through_bitsandbytes_config(tmp_path):
    from qlora_trainer.models.tiny import random_model

    ref = random_model("tiny", seed=3)
    ref.save_pretrained(tmp_path / "m")
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "m"), "tokenizer": "random:tiny"}})
    model = load_base_model(cfg, device=CPU, dtype=torch.float32)
    assert _n4bit(model) == 28 and not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        dense = ref(ids).logits
        ours = quantize_model(ref, compute_dtype=torch.float32)(ids).logits  # module-replacement path
        got = model(ids).logits
    torch.testing.assert_close(got, ours)  # transformers' bnb loading == our quantize_model
    assert (got - dense).abs().max() > 0  # and it really is quantized


def test_missing_local_path_is_one_line_error(tmp_path):
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "no" / "such")}})
    with pytest.raises(QloraError, match="does not exist") as e:
        load_base_model(cfg, device=CPU, dtype=torch.float32)
    assert "\n" not in str(e.value)


def test_unknown_random_arch_names_nearest():
    cfg = config_from_dict({"model": {"name_or_path": "random:tinny"}})
    with pytest.raises(QloraError, match="did you mean 'tiny'"):
        load_base_model(cfg, device=CPU, dtype=torch.float32)


def test_offline_hub_id_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config_from_dict({"model": {"name_or_path": "no-such-org/no-such-model"}})
    with pytest.raises(QloraError, match="model.tokenizer: cannot load") as e:
        load_tokenizer(cfg.model)
    assert "\n" not in str(e.value)


def test_pad_token_reuses_unk_without_resizing():
    from qlora_trainer.runtime import data_root

    path = data_root() / "llama2-tokenizer"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    base = {"name_or_path": "random:tiny", "tokenizer": str(path)}
    tok = load_tokenizer(config_from_dict({"model": base}).model)
    assert tok.pad_token == "<unk>" and len(tok) == 32000
    tok = load_tokenizer(config_from_dict({"model": {**base, "resize_embeddings": True}}).model)
    assert tok.pad_token == "<pad>" and len(tok) == 32001


def test_byte_tokenizer_for_random_models():
    tok = load_tokenizer(config_from_dict({"model": {"name_or_path": "random:tiny"}}).model)
    assert len(tok) == 260 and tok.pad_token_id == 259 and tok.eos_token_id == 258
