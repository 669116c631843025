import importlib.util
from pathlib import Path

import pytest

from qlora_trainer.config import Config, load_config
from qlora_trainer.errors import ConfigError


def test_kernels_is_not_a_top_level_package():
    ours = importlib.util.find_spec("qlora_trainer.kernels")
    bare = importlib.util.find_spec("kernels")  # nothing, or Hugging Face's (transformers >= 5.25 requires it)
    assert ours is not None
    assert bare is None or Path(bare.origin).parent != Path(ours.origin).parent


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora: {r: 8}\ntrain: {lr: 1.0e-4}\noutput_dir: out\n")
    cfg = load_config(p, ["train.max_steps=7", "lora.targets=[q_proj, v_proj]"])
    assert isinstance(cfg, Config)
    assert (cfg.lora.r, cfg.train.lr, cfg.train.max_steps, cfg.output_dir) == (8, 1e-4, 7, "out")
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 32.0 and cfg.lora.dropout == 0.05


@pytest.mark.parametrize("text,match", [
    ("lora: {rank: 8}\n", r"unknown key 'lora.rank'; did you mean 'lora.r'\?"),
    ("trian: {lr: 1}\n", r"unknown key 'trian'"),
    ("train: {optimizer: adam8bit}\n", r"train.optimizer: 'adam8bit' is not one of .*did you mean 'adamw_8bit'"),
    ("train: {batch_size: two}\n", r"train.batch_size: expected int"),
    ("lora: {dropout: 1.5}\n", r"lora.dropout: must be in \[0, 1\)"),
    ("train: [1, 2\n", r"line \d+ invalid YAML"),
])
def test_bad_config_is_one_line_error(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train.lrr'; did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1"])
