"""Every config field is checked against its rule (its section's RULES) at load time, its range is in
its documentation, and each bad value ends as one ``error:`` line naming the key (exit 2, no traceback)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from qlora_trainer import config as config_mod

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# (override, text the one-line error must contain); each passed the old check or failed later
BAD_VALUES = [
    ("train.seed=-1", "train.seed: must be in [0, 4294967295] (got -1)"),
    ("train.seed=4294967296", "train.seed: must be in [0, 4294967295]"),
    ("train.device=cuda:abc", "train.device: must be auto, cpu, cuda or cuda:N"),
    ("train.device=gpu", "train.device: must be auto, cpu, cuda or cuda:N"),
    ("data.max_samples=0", "data.max_samples: must be >= 1 (got 0)"),
    ("data.num_proc=0", "data.num_proc: must be >= 1"),
    ("performance.mlp_chunk_tokens=-4", "performance.mlp_chunk_tokens: must be >= 0"),
    ("performance.loss_chunk_size=-1", "performance.loss_chunk_size: must be >= 0"),
    ("eval.batches=-1", "eval.batches: must be >= 0"),
    ("train.lr=.inf", "train.lr: must be a finite number (got inf)"),
    ("train.lr=.nan", "train.lr: must be a finite number (got nan)"),
    ("train.lr=nan", "train.lr: must be a finite number (got nan)"),
    ("lora.alpha=-.inf", "lora.alpha: must be a finite number"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm: must be a finite number"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.skip_bad_steps=-1", "train.skip_bad_steps: must be >= 0"),
    ("lora.targets=[]", "lora.targets: must not be empty"),
    ("output_dir=' '", "output_dir: must be a non-empty string"),
    ("data.path=''", "data.path: must be a non-empty string"),
    ("quantization.blocksize=100", "quantization.blocksize: must be one of 64, 128"),
]


@pytest.mark.parametrize("override,text", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_error_naming_key_and_range(cli_error, tmp_path, override, text):
    assert text in cli_error("train", DEMO, f"output_dir={tmp_path / 'out'}", override)
    assert not (tmp_path / "out").exists()  # refused at load time, before anything is created


def _numeric_keys() -> list[str]:
    keys = []
    for key in config_mod.valid_keys():  # nested sections too (lora.adalora.*)
        *path, name = key.split(".")
        cls = config_mod.Config
        for part in path:
            cls = typing.get_type_hints(cls)[part]
        tp = typing.get_type_hints(cls)[name]
        args = typing.get_args(tp) or (tp,)
        if any(a in (int, float) for a in args):
            keys.append(key)
    return keys


def test_every_numeric_field_has_a_rule_stated_in_its_docs():
    docs = config_mod.field_docs()
    rules = config_mod.rules()
    missing = [k for k in _numeric_keys() if k not in rules]
    assert not missing, f"add a rule to the section's RULES for {missing}"
    for key in rules:
        assert key in docs and "Allowed: " in docs[key], key
    assert docs["train.seed"].endswith("Allowed: in [0, 4294967295].")


def test_defaults_and_shipped_configs_pass_the_rules():
    config_mod.Config().validate()
    for path in (DEMO.parent).glob("*.yaml"):
        config_mod.load_config(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_on_a_cpu_machine_is_refused_before_loading(cli_error, tmp_path):
    msg = cli_error("train", DEMO, "train.device=cuda", f"output_dir={tmp_path / 'o'}")
    assert msg == "train.device: 'cuda' but this machine has no CUDA GPU that torch can use; " \
                  "set train.device=cpu (or auto)"


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "0"])
def test_memory_budget_must_be_finite_and_positive(cli_error, budget):
    msg = cli_error("memory", "llama-2-7b", f"--budget={budget}")
    assert msg.startswith("--budget: must be a finite number of GB > 0, e.g. --budget 24")


@pytest.mark.parametrize("chart", ["out.jpg", "chart", "x.PNGX"])
def test_memory_table_chart_extension_checked_before_work(cli_error, tmp_path, chart):
    msg = cli_error("memory-table", "--chart", tmp_path / chart)
    assert msg.startswith("--chart: ") and "end it in .png, .svg, .pdf" in msg
    assert not list(tmp_path.iterdir())


def test_chart_path_inside_a_file_is_one_line(cli_error, tmp_path):
    (tmp_path / "f").write_text("mine")
    msg = cli_error("memory-table", "--chart", tmp_path / "f" / "c.png")
    assert msg == f"cannot write {tmp_path / 'f' / 'c.png'}: {tmp_path / 'f'} is in the way (a file, not a " \
                  f"directory); choose another path"
