"""Fine-tuning methods on the small model: parameter counts, NF4 base, a short run, data errors."""

from __future__ import annotations

import pytest
import torch

from support.finetune import FinetuneConfig, finetune, gsm8k_text, prepare
from support.small_lm import SmallLM, SmallLMConfig, encode


@pytest.fixture
def lm(tiny_model):
    ids = encode("Question: what is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5\n\n" * 30)
    return SmallLM(tiny_model, cfg=SmallLMConfig(), train_ids=ids, eval_ids=ids)


def test_prepare_sets_up_each_method(lm):
    from qlora_trainer.lora import LoRALinear, trainable_parameters
    from qlora_trainer.models.quantize import is_4bit

    full = prepare(lm, FinetuneConfig(method="full"))
    t_full, total = trainable_parameters(full)
    assert t_full == total
    lora = prepare(lm, FinetuneConfig(method="lora", r=4, targets=("q_proj", "v_proj")))
    q = lora.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and not is_4bit(q.base_layer)
    assert not isinstance(lora.model.layers[0].self_attn.k_proj, LoRALinear)
    # q: 4*(128+128), v: 4*(128+64) per layer, 4 layers
    assert trainable_parameters(lora)[0] == 4 * (4 * 256 + 4 * 192)
    qlora = prepare(lm, FinetuneConfig(method="qlora", r=4))
    assert is_4bit(qlora.model.layers[0].mlp.down_proj.base_layer)
    assert lm.model.model.layers[0].self_attn.q_proj.weight.requires_grad     # the source is untouched
    with pytest.raises(ValueError, match="method"):
        prepare(lm, FinetuneConfig(method="prefix"))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_learns_the_task(lm, method):
    cfg = FinetuneConfig(method=method, r=4, alpha=8, steps=6, lr=1e-2, warmup_steps=1, batch_size=2,
                         seq_len=32, eval_windows=4)
    res = finetune(lm, cfg, lm.train_ids, lm.eval_ids)
    assert res.eval_after < res.eval_before - 0.1
    assert len(res.losses) == 6 and res.row()["method"] == method
    assert 0 < res.trainable < res.total


def test_gsm8k_bad_record_names_file_and_line(tmp_path, monkeypatch):
    from qlora_trainer.errors import DataError

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 1}\n')
    monkeypatch.setenv("QLORA_DATA", str(tmp_path))
    assert gsm8k_text("train", max_records=1) == "Question: q\nAnswer: a\n\n"
    with pytest.raises(DataError, match=r"train.jsonl:2"):
        gsm8k_text("train", max_records=5)
