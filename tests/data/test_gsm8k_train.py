"""The GSM8K config trains a few steps on the CPU with the real Llama-2 tokenizer (random tiny model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qlora_trainer.config import load_config
from qlora_trainer.runtime import data_root

train_mod = pytest.importorskip("qlora_trainer.train", reason="trainer not landed yet")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (data_root() / "gsm8k" / "train.jsonl").is_file(), reason="needs $QLORA_DATA/gsm8k")
def test_gsm8k_config_trains_a_few_steps(tmp_path):
    cfg = load_config(REPO / "configs" / "gsm8k.yaml", [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=1", "train.grad_accum=1",
        "performance.loss_chunk_size=256", "eval.every=0", "train.lr=1e-3", "data.max_samples=8",
        "data.eval_path=null", "data.seq_len=128", "output.progress_bar=false", "lora.r=4",
        "performance.gradient_checkpointing=false",
    ])
    result = train_mod.train(cfg)
    assert result.step == 2 and len(result.losses) == 2
    # a random model over the 32,000-token Llama-2 vocab starts near ln(32000) = 10.4
    assert all(math.isfinite(x) for x in result.losses) and 9.0 < result.losses[0] < 11.5
    assert result.adapter_dir is not None and (result.adapter_dir / "adapter_config.json").is_file()
