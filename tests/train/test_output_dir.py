"""A bad ``output_dir`` (a file, inside a file, not writable) is refused before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture
def no_loading(monkeypatch):
    import qlora_trainer.train.recipe as load  # where train() looks the loader up

    monkeypatch.setattr(load, "load_tokenizer", lambda *_: pytest.fail("loaded before the output check"))


def test_output_dir_that_is_a_file(cli_error, tmp_path, no_loading):
    f = tmp_path / "results"
    f.write_text("mine")
    msg = cli_error("train", DEMO, f"output_dir={f}")
    assert msg == f"output_dir: '{f}' is a file; choose a directory path for output_dir"
    assert f.read_text() == "mine"


def test_output_dir_inside_a_file(cli_error, tmp_path, no_loading):
    f = tmp_path / "results"
    f.write_text("mine")
    msg = cli_error("train", DEMO, f"output_dir={f / 'run' / 'x'}")
    assert msg == f"output_dir: '{f / 'run' / 'x'}' is inside '{f}', which is a file; choose a directory path " \
                  f"for output_dir"


def test_output_dir_not_writable(cli_error, tmp_path, no_loading, monkeypatch):
    import os

    from qlora_trainer.train import guards

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access  # root ignores permission bits, so the answer is simulated
    monkeypatch.setattr(guards.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    msg = cli_error("train", DEMO, f"output_dir={locked / 'run'}")
    assert msg == f"output_dir: '{locked}' is not writable; choose another output_dir or fix its permissions"
    assert not (locked / "run").exists()
