"""One run per output_dir: a second run is refused, a stale lock (dead process) is taken over with a
warning, and the lock goes away however the run ends."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_trainer.config import save_config
from qlora_trainer.train import recipe, train
from qlora_trainer.train.lock import LOCK


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}) + "\n")
    return path


def test_second_run_on_the_same_output_dir_is_refused(cli_error, tiny_cfg, tmp_path):
    out = Path(tiny_cfg.output_dir)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(out, sleeper.pid)  # a live run on this machine
        save_config(tiny_cfg, tmp_path / "c.yaml")
        msg = cli_error("train", tmp_path / "c.yaml")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert msg == (f"output_dir: '{out}' is in use by another run (process {sleeper.pid} on this machine); wait "
                   f"for it to finish or choose another output_dir (if that run is gone, delete {lock})")
    assert lock.is_file() and not (out / "checkpoints").exists()  # nothing of the other run touched


def test_lock_of_another_host_is_refused_and_names_the_host(cli_error, tiny_cfg, tmp_path):
    out = Path(tiny_cfg.output_dir)
    _write_lock(out, 1, host="elsewhere")
    save_config(tiny_cfg, tmp_path / "c.yaml")
    assert "(process 1 on host elsewhere)" in cli_error("train", tmp_path / "c.yaml")


def test_stale_lock_is_taken_over_with_a_warning_and_released(tiny_cfg, caplog):
    tiny_cfg.train.max_steps = 1
    out = Path(tiny_cfg.output_dir)
    dead = _dead_pid()
    _write_lock(out, dead)
    with caplog.at_level(logging.WARNING):
        res = train(tiny_cfg)
    assert res.step == 1
    assert f"taking over the lock of process {dead}, which is gone" in caplog.text
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("how", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_lock_is_released_on_interrupt_and_error(tiny_cfg, monkeypatch, how):
    def boom(*args, **kwargs):
        assert (Path(tiny_cfg.output_dir) / LOCK).is_file()  # held while training
        raise how("stop")

    monkeypatch.setattr(recipe, "causal_lm_loss", boom)
    with pytest.raises(how):
        train(tiny_cfg)
    assert not (Path(tiny_cfg.output_dir) / LOCK).exists()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from qlora_trainer.train.lock import output_lock

    monkeypatch.setenv("RANK", "1")
    with output_lock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with output_lock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK).exists()
