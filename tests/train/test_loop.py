"""train(): metrics, adapter output, exact resume, output-dir safety, and the demo's loss going down."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from qlora_trainer.errors import QloraError
from qlora_trainer.train import train


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def test_run_writes_metrics_checkpoints_and_adapter(tiny_cfg):
    tiny_cfg.train.save_every = 1
    tiny_cfg.output.keep_last = 2
    tiny_cfg.data.eval_fraction = 0.25
    tiny_cfg.eval.every = 2
    res = train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    evals = [r for r in _rows(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and res.eval_loss == evals[-1]["eval_loss"] > 0
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "mem_gb", "grad_norm", "tokens"} <= set(r)
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["mem_gb"] > 0
    assert [r["loss"] for r in rows] == res.losses
    # retention: only the newest keep_last checkpoints, no temp leftovers
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]
    ckpt = out / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.iterdir()} == {"adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "manifest.json",
                                                "trainer_state.json", "config.yaml"}  # no trainable.safetensors
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    adapter = out / "adapter"
    assert res.adapter_dir == adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml"} <= {p.name for p in adapter.iterdir()}
    # a finished adapter is never overwritten by accident
    with pytest.raises(QloraError, match="output.overwrite"):
        train(tiny_cfg)


def test_interrupted_then_resumed_logs_identical_losses(tiny_cfg, tmp_path):
    tiny_cfg.train.max_steps = 5
    tiny_cfg.train.save_every = 2
    tiny_cfg.data.max_samples = 12  # 6 micro-batches per epoch: step 3 ends epoch 0, resume crosses it
    full = copy.deepcopy(tiny_cfg)
    full.output_dir = str(tmp_path / "full")
    train(full)

    part = copy.deepcopy(tiny_cfg)
    part.output_dir = str(tmp_path / "part")
    res = train(part, stop_after=3)  # "pre-empted" after step 3: checkpoints step-2 and step-3
    assert res.adapter_dir is None and res.step == 3
    # resume from the older checkpoint: step 3's log line is dropped and step 3 runs again
    part.resume = str(Path(part.output_dir) / "checkpoints" / "step-2")
    train(part, stop_after=1)
    part.resume = "auto"
    res = train(part)
    assert res.resumed_from.name == "step-3" and res.step == 5
    assert list(_losses(Path(part.output_dir))) == [1, 2, 3, 4, 5]
    assert _losses(Path(part.output_dir)) == _losses(Path(full.output_dir))  # bit-exact


@pytest.mark.parametrize("how", ["ctrl-c mid-accumulation", "sigterm inside an optimizer step"])
def test_interrupt_saves_last_completed_step_and_resume_is_exact(tiny_cfg, tmp_path, monkeypatch, how):
    """Ctrl-C in step 4's second micro-batch (step 4's first micro-batch already moved the RNG and left
    gradients), or SIGTERM while step 3 is applied (held until it is done): checkpoint step-3, then
    KeyboardInterrupt / exit 143; resume=auto logs the uninterrupted run's losses bit for bit."""
    import signal

    from qlora_trainer.lora.peft_format import WEIGHTS_NAME
    from qlora_trainer.train import recipe

    tiny_cfg.train.max_steps, tiny_cfg.train.save_every = 5, 2
    full, part = copy.deepcopy(tiny_cfg), copy.deepcopy(tiny_cfg)
    full.output_dir, part.output_dir = str(tmp_path / "full"), str(tmp_path / "part")
    train(full)

    calls = {"loss": 0, "rng": 0}

    def counted(name, real, at, act):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if calls[name] == at:
                act()
            return real(*args, **kwargs)
        return wrapper

    def ctrl_c():
        raise KeyboardInterrupt

    if how.startswith("ctrl-c"):  # 2 micro-batches a step: call 8 is step 4's second
        monkeypatch.setattr(recipe, "causal_lm_loss", counted("loss", recipe.causal_lm_loss, 8, ctrl_c))
    else:  # rng_state: once at the start, then at the end of each step inside the held block
        monkeypatch.setattr(recipe, "rng_state", counted("rng", recipe.rng_state, 4,
                                                       lambda: os.kill(os.getpid(), signal.SIGTERM)))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt if how.startswith("ctrl-c") else SystemExit) as exc:
        train(part)
    assert how.startswith("ctrl-c") or exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is handler
    ckpt = Path(part.output_dir) / "checkpoints" / "step-3"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    assert not (ckpt / "trainable.safetensors").exists() and (ckpt / "adapter" / WEIGHTS_NAME).is_file()
    monkeypatch.undo()
    part.resume = "auto"
    res = train(part)
    assert res.resumed_from == ckpt and res.losses == list(_losses(Path(full.output_dir)).values())[3:]
    assert _losses(Path(part.output_dir)) == _losses(Path(full.output_dir))  # bit-exact


def test_fresh_run_refuses_stale_checkpoints(tiny_cfg):
    train(tiny_cfg, stop_after=1)
    with pytest.raises(QloraError, match="resume=auto"):
        train(tiny_cfg)


def test_demo_config_loss_decreases(tmp_path):
    """configs/demo.yaml, shortened: the loss falls clearly within a dozen steps."""
    from qlora_trainer.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "demo.yaml",
                      ["train.max_steps=12", "train.save_every=0", "data.max_samples=120",
                       "output.progress_bar=false", f"output_dir={tmp_path / 'demo'}"])
    losses = train(cfg).losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses


def test_eval_every_n_steps_leaves_training_bit_identical(tiny_cfg, tmp_path, monkeypatch):
    """Evaluating every step changes no training loss, even where bitsandbytes would repack NF4
    weights for its AVX512-BF16 CPU kernel in eval mode (forced on here whatever this CPU has): that
    repacking dropped input gradients in every step after the first eval (issue 13)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    tiny_cfg.data.eval_fraction = 0.25
    tiny_cfg.train.max_steps = 3
    runs = {}
    for every in (0, 1):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.eval.every = every
        cfg.output_dir = str(tmp_path / f"eval{every}")
        runs[every] = train(cfg)
    assert runs[1].eval_loss is not None and runs[1].eval_loss > 0
    assert runs[1].losses == runs[0].losses and len(runs[0].losses) == 3
