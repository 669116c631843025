"""Preference objectives in the training loop: gradient accumulation equals one large batch,
kill-and-resume is exact, the rewards show in metrics.jsonl, and DPO's margin grows."""

from __future__ import annotations

import json

import pytest

from qlora_trainer.config import config_from_dict
from qlora_trainer.train import train


def _cfg(tmp_path, name: str, objective: str = "dpo", **train_kw):
    fmt = "unpaired" if objective == "kto" else "preference"
    path = "builtin:demo-pairs"
    if objective == "kto":
        path = str(tmp_path / "unpaired.jsonl")
        if not (tmp_path / "unpaired.jsonl").exists():
            from qlora_trainer.data.builtin_pairs import demo_pairs

            rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                    for i, r in enumerate(demo_pairs(16)) for side in (("chosen",) if i % 2 else ("rejected",))]
            (tmp_path / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict({
        "model": {"name_or_path": "random:tiny", "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                 "targets": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]},
        "data": {"path": path, "format": fmt, "seq_len": 48, "max_samples": 16},
        "train": {"max_steps": 3, "lr": 3e-3, "batch_size": 4, "grad_accum": 1, "seed": 0, "device": "cpu",
                  "optimizer": "adamw", "objective": objective, **train_kw},
        "output": {"progress_bar": False, "keep_last": 5},
        "output_dir": str(tmp_path / name),
    }).validate()


def _metrics(cfg) -> list[dict]:
    lines = (open(cfg.output_dir + "/metrics.jsonl").read().splitlines())
    return [json.loads(ln) for ln in lines if '"loss"' in ln]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_accumulation_equals_one_large_batch(tmp_path, objective):
    """4 pairs x 1 micro-batch vs 1 pair x 4 micro-batches (different padding per micro-batch): same
    step losses and reward metrics. ORPO mixes a token mean with a pair mean: both stay exact."""
    big = train(_cfg(tmp_path, "big", objective))
    small_cfg = _cfg(tmp_path, "small", objective, batch_size=1, grad_accum=4)
    small = train(small_cfg)
    assert big.losses == pytest.approx(small.losses, rel=1e-5, abs=1e-6)
    m_big, m_small = _metrics(_cfg(tmp_path, "big", objective)), _metrics(small_cfg)
    for a, b in zip(m_big, m_small):
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert m_big[-1]["rewards/margins"] != 0


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_stop_and_resume_is_exact(tmp_path, objective):
    full = train(_cfg(tmp_path, "full", objective, max_steps=4))
    part = _cfg(tmp_path, "part", objective, max_steps=4)
    first = train(part, stop_after=2)
    part.resume = "auto"
    rest = train(part)
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    assert rest.resumed_from is not None and rest.adapter_dir is not None


def test_dpo_margin_and_accuracy_rise(tmp_path):
    cfg = _cfg(tmp_path, "rise", "dpo", max_steps=12, lr=5e-3)
    cfg.output.log_every = 1
    train(cfg)
    rows = _metrics(cfg)
    first, last = rows[0], rows[-1]
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0  # policy == reference at step 1
    assert last["rewards/margins"] > 0.2 and last["rewards/accuracies"] >= 0.75
    assert last["loss"] < first["loss"] - 0.05


def test_gsm8k_dpo_config_shortened_learns_the_correct_arithmetic(tmp_path):
    """configs/dpo-gsm8k-cpu.yaml, shortened: over 12 steps the reward margin and accuracy rise."""
    from qlora_trainer.config import load_config
    from qlora_trainer.runtime import data_root

    if not (data_root() / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("needs $QLORA_DATA/gsm8k")
    cfg = load_config("configs/dpo-gsm8k-cpu.yaml", [f"output_dir={tmp_path / 'run'}", "train.max_steps=12",
                                                     "data.seq_len=128", "data.max_samples=64", "output.log_every=1"])
    train(cfg)
    rows = _metrics(cfg)
    margins = [r["rewards/margins"] for r in rows]
    accuracy = [r["rewards/accuracies"] for r in rows]
    assert margins[0] == 0  # the adapter starts at zero: policy == reference
    assert sum(margins[-4:]) / 4 > 0.1 and sum(accuracy[-4:]) / 4 >= 0.6


def test_preference_adapter_loads_in_peft(tmp_path):
    """The adapter a DPO run saves is PEFT's format: PeftModel loads every tensor, trained (B != 0)."""
    peft = pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file

    from qlora_trainer.models.tiny import random_model

    res = train(_cfg(tmp_path, "peft", "dpo", max_steps=2))
    saved = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    model = peft.PeftModel.from_pretrained(random_model("tiny", seed=0), str(res.adapter_dir))
    state = model.state_dict()
    for key, value in saved.items():
        theirs = state[key.replace(".weight", ".default.weight")]
        torch.testing.assert_close(theirs.float(), value.float())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())


@pytest.mark.parametrize("objective", ["dpo", "kto", "orpo"])
def test_eval_runs_on_the_adapter(tmp_path, objective, capsys):
    """``qlora-trainer eval`` scores a preference-trained adapter like any other (a QA task file)."""
    from qlora_trainer.cli import main

    res = train(_cfg(tmp_path, "run", objective, max_steps=1))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "answer": str(i + 1)}) + "\n"
                          for i in range(3)))
    out = tmp_path / "eval"
    assert main(["eval", str(res.adapter_dir), "--task", f"{qa}@last_number", "--limit", "3",
                 "--max-new-tokens", "4", "--no-progress", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (label,) = summary["adapters"]
    assert summary["results"][label]["qa"]["n"] == 3
