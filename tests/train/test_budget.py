"""Sizing a run (``train.max_steps`` or ``train.epochs``) and continuing a finished run with a larger
budget: ``resume=auto`` continues from the newest checkpoint, bit-exactly as one longer run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from qlora_trainer.cli import main
from qlora_trainer.config import save_config


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train_cli(capsys, cfg, path: Path, *overrides: str) -> str:
    """``qlora-trainer train`` in-process: exit 0 and a stderr without a traceback; returns stdout."""
    save_config(cfg, path)
    rc = main(["train", str(path), *overrides])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "error:" not in err, err
    assert rc == 0, err
    return out


def test_finished_run_continues_with_a_larger_step_budget_bit_exact(tiny_cfg, tmp_path, capsys):
    tiny_cfg.data.max_samples = 12  # 6 micro-batches per epoch: the continued steps cross an epoch
    full = copy.deepcopy(tiny_cfg)
    full.train.max_steps, full.output_dir = 6, str(tmp_path / "full")
    _train_cli(capsys, full, tmp_path / "full.yaml")

    part = copy.deepcopy(tiny_cfg)
    part.train.max_steps, part.output_dir = 3, str(tmp_path / "part")
    _train_cli(capsys, part, tmp_path / "part.yaml")
    out = Path(part.output_dir)
    assert (out / "adapter" / "adapter_config.json").is_file()
    said = _train_cli(capsys, part, tmp_path / "part.yaml", "resume=auto", "train.max_steps=6")
    assert "loss" in said and "over steps 4..6" in said
    assert _losses(out) == _losses(Path(full.output_dir))  # bit-exact, steps 1..6
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert adapter == (Path(full.output_dir) / "adapter" / "adapter_model.safetensors").read_bytes()

    # nothing left to do: said so, exit 0, nothing touched
    said = _train_cli(capsys, part, tmp_path / "part.yaml", "resume=auto", "train.max_steps=6")
    assert said.startswith(f"the run in {out} is already complete (step 6)")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_epochs_size_the_run_and_a_second_epoch_continues_it(tiny_cfg, tmp_path, capsys):
    tiny_cfg.data.max_samples = 12  # 6 micro-batches of 2 per epoch, 2 per step
    tiny_cfg.train.max_steps, tiny_cfg.train.epochs = None, 2.0
    full = copy.deepcopy(tiny_cfg)
    full.output_dir = str(tmp_path / "full")
    _train_cli(capsys, full, tmp_path / "full.yaml")
    steps_2 = max(_losses(Path(full.output_dir)))

    part = copy.deepcopy(tiny_cfg)
    part.train.epochs, part.output_dir = 1.0, str(tmp_path / "part")
    _train_cli(capsys, part, tmp_path / "part.yaml")
    steps_1 = max(_losses(Path(part.output_dir)))
    assert steps_2 == 2 * steps_1 == 6
    saved = (Path(part.output_dir) / "adapter" / "config.yaml").read_text()
    assert f"max_steps: {steps_1}" in saved and "epochs: null" in saved  # reloadable as it is
    _train_cli(capsys, part, tmp_path / "part.yaml", "resume=auto", "train.epochs=2")
    assert _losses(Path(part.output_dir)) == _losses(Path(full.output_dir))


def test_epochs_and_max_steps_together_are_one_line_error(cli_error, tiny_cfg, tmp_path):
    save_config(tiny_cfg, tmp_path / "c.yaml")  # max_steps: 4
    msg = cli_error("train", tmp_path / "c.yaml", "train.epochs=1")
    assert msg == ("train.epochs: 1 and train.max_steps 4 both size the run; set one of them "
                   "(train.max_steps=null to count in epochs)")
    assert not Path(tiny_cfg.output_dir).exists()


def test_epochs_set_the_schedule_length_and_the_progress_bar(tiny_cfg):
    """A cosine schedule over 1 epoch decays to 0 exactly at the epoch's last step; the bar counts the
    same steps and names the epochs."""
    import torch

    from qlora_trainer.data import build_datasets
    from qlora_trainer.models.tiny import byte_tokenizer
    from qlora_trainer.train.budget import budget_label, resolve_budget
    from qlora_trainer.train.loop import progress_bar as _progress
    from qlora_trainer.train.setup import build_scheduler

    tiny_cfg.data.max_samples = 12
    tiny_cfg.train.max_steps, tiny_cfg.train.epochs, tiny_cfg.train.schedule = None, 1.0, "cosine"
    tiny_cfg.train.warmup_steps = 1
    tok = byte_tokenizer()
    train_ds, _ = build_datasets(tiny_cfg.data, tok, seed=0)
    cfg = resolve_budget(tiny_cfg, train_ds, tok)
    assert (cfg.train.max_steps, cfg.train.epochs) == (3, None) and tiny_cfg.train.epochs == 1.0  # a copy
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == 1.0 and 0 < lrs[2] < 1 and opt.param_groups[0]["lr"] == 0.0
    assert budget_label(cfg, 1.0) == "train (1 epoch = 3 steps)"
    bar = _progress(cfg, 0, enabled=False, desc=budget_label(cfg, 1.0))
    assert bar.total == 3
    bar.close()
