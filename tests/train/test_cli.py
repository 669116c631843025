"""``qlora-trainer train``: one-line config errors with exit 2, --help-config, and every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_trainer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_misspelled_key_is_one_line_error_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_step: 3\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ") and "'train.max_step'" in err and "did you mean 'train.max_steps'" in err


def test_misspelled_override_is_one_line_error_exit_2(capsys):
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), "lora.rank=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "command line" in err and "'lora.r'" in err


def test_help_config_lists_documented_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.max_grad_norm" in out and "Gradient clipping" in out and "output.keep_last" in out
    assert "performance.gradient_checkpointing" in out and "eval.every" in out
    assert "performance.compile" not in out and "performance.nf4_matmul" not in out  # not measured yet


@pytest.mark.parametrize("old,new", [("train.compile", "performance.compile"), ("model.kernels", "performance.kernels"),
                                     ("train.eval_every", "eval.every"), ("train.loss_chunk_size",
                                                                        "performance.loss_chunk_size")])
def test_a_moved_key_names_its_new_place(old, new, tmp_path):
    from qlora_trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"command line: {old} is now {new}; rename it there"):
        load_config(None, [f"{old}=1"])
    cfg = tmp_path / "c.yaml"
    section, key = old.split(".")
    cfg.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"{cfg}: {old} is now {new}"):
        load_config(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    from qlora_trainer.config import load_config

    cfg = load_config(path)
    assert cfg.model.name_or_path and cfg.train.max_steps >= 1
