"""``output.report_to``: TensorBoard event files tensorboard's own reader loads (config, every metrics
line, the memory estimate); a missing or failing tracker is one warning, never a crash."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qlora_trainer.config import config_from_dict
from qlora_trainer.errors import ConfigError
from qlora_trainer.train import train


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_events_hold_every_metrics_line(tiny_cfg):
    pytest.importorskip("tensorboard")
    tiny_cfg.output.report_to = ["tensorboard"]
    tiny_cfg.train.max_steps = 3
    tiny_cfg.data.eval_fraction = 0.1
    tiny_cfg.eval.every = 2
    train(tiny_cfg)
    out = Path(tiny_cfg.output_dir)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]  # metrics.jsonl stays
    scalars = _scalars(out / "tracking")
    steps = [r for r in rows if "loss" in r]
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in steps] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3]
    for key in ("grad_norm", "tokens_per_s", "mem_gb", "tokens", "epoch"):  # every numeric field of a line
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in steps], rel=1e-6), key
    evals = [r for r in rows if "eval_loss" in r]
    assert [s for s, _ in scalars["eval_loss"]] == [r["step"] for r in evals] == [2, 3]
    assert [v for _, v in scalars["eval_loss"]] == pytest.approx([r["eval_loss"] for r in evals], rel=1e-6)
    assert scalars["memory/estimate_gb"][0][0] == 0 and scalars["memory/estimate_gb"][0][1] > 0
    hparams = list((out / "tracking").rglob("hparams.yml"))  # the config, as accelerate stores it
    import yaml

    assert len(hparams) == 1 and yaml.safe_load(hparams[0].read_text())["lora.r"] == tiny_cfg.lora.r


def test_missing_tracker_package_is_one_warning(tiny_cfg, caplog, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    tiny_cfg.output.report_to = ["wandb"]
    tiny_cfg.train.max_steps = 1
    with caplog.at_level(logging.WARNING, logger="qlora_trainer.train.trackers"):
        result = train(tiny_cfg)
    assert result.step == 1 and (Path(tiny_cfg.output_dir) / "metrics.jsonl").is_file()
    warned = [r.getMessage() for r in caplog.records if r.name == "qlora_trainer.train.trackers"]
    assert warned == ["output.report_to: wandb is not installed; not logging to it (pip install wandb)"]


def test_tracker_that_cannot_start_or_log_is_dropped(caplog):
    from qlora_trainer.train.trackers import start_trackers

    class Acc:
        log_with, trackers = ["wandb"], []

        def init_trackers(self, *a, **k):
            raise ConnectionError("network unreachable")

    class File:
        rows: list = []

        def write(self, row):
            self.rows.append(row)

    cfg = config_from_dict({"output_dir": "x"})
    f = File()
    with caplog.at_level(logging.WARNING):
        tracked = start_trackers(Acc(), cfg, f)
        tracked.write({"step": 1, "loss": 1.0})
    assert f.rows == [{"step": 1, "loss": 1.0}]
    assert any("could not start (ConnectionError: network unreachable)" in r.getMessage() for r in caplog.records)


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"output.report_to: 'tensorbord' is not a tracker.*did you mean 'tensorboard'"):
        config_from_dict({"output": {"report_to": ["tensorbord"]}}).validate()


def test_wandb_without_a_key_starts_offline(monkeypatch, tmp_path, caplog):
    from qlora_trainer.train.trackers import start_trackers

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    seen = {}

    class Acc:
        log_with, trackers = ["wandb"], []

        def init_trackers(self, name, config, init_kwargs):
            seen.update(name=name, config=config, init_kwargs=init_kwargs)

    cfg = config_from_dict({"output_dir": str(tmp_path / "myrun"), "lora": {"targets": ["q_proj", "v_proj"]}})
    with caplog.at_level(logging.WARNING):
        start_trackers(Acc(), cfg, None)
    assert seen["name"] == "myrun" and seen["init_kwargs"]["wandb"]["mode"] == "offline"
    assert seen["config"]["lora.targets"] == "['q_proj', 'v_proj']" and seen["config"]["train.lr"] == cfg.train.lr
    assert any("logging offline" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("WANDB_API_KEY", "x")
    start_trackers(Acc(), cfg, None)
    assert seen["init_kwargs"] == {}
