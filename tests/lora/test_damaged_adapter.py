"""A damaged adapter directory (a file cut short by an interrupted copy or a full disk, or malformed)
is one line naming the file, what is wrong and what to do, for every command that reads adapters."""

from __future__ import annotations

import shutil

import pytest
import torch

from qlora_trainer.config import Config, LoRAConfig
from qlora_trainer.lora import inject_lora, save_adapter
from qlora_trainer.models.load import load_base_model
from qlora_trainer.models.tiny import byte_tokenizer

FIX = "copy the adapter directory again (an interrupted copy or a full disk cuts files short) or re-train it"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    cfg = Config()
    cfg.model.name_or_path, cfg.model.quantization, cfg.train.device = "random:tiny", "none", "cpu"
    cfg.lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32, vocab_size=260).eval()
    inject_lora(model, cfg.lora, dtype=torch.float32)
    return save_adapter(model, tmp_path_factory.mktemp("good") / "adapter", cfg=cfg.lora, base_model="random:tiny",
                        tokenizer=byte_tokenizer(), run_config=cfg)


def _damaged(adapter, tmp_path, name: str, keep: float):
    """A copy of ``adapter`` whose file ``name`` keeps only its first ``keep`` fraction."""
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: int(len(data) * keep)])
    return bad, len(data)


COMMANDS = {
    "generate": lambda d, tmp: ["generate", "--adapter", d, "--prompt", "hi", "--max-new-tokens", "1"],
    "merge": lambda d, tmp: ["merge", d, "-o", tmp / "merged"],
    "eval": lambda d, tmp: ["eval", d, "--no-tasks", "--perplexity", "--output", tmp / "ev"],
    "combine": lambda d, tmp: ["combine", d, d, "-o", tmp / "combined"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_truncated_weights_are_one_line_for_every_command(cli_error, adapter, tmp_path, command):
    bad, full = _damaged(adapter, tmp_path, "adapter_model.safetensors", 0.6)
    msg = cli_error(*COMMANDS[command](bad, tmp_path))
    assert msg == f"{bad / 'adapter_model.safetensors'}: truncated ({int(full * 0.6)} of {full} bytes); {FIX}"


@pytest.mark.parametrize("name, what", [
    ("adapter_config.json", "invalid JSON ("),
    ("config.yaml", "is cut short (its last line"),
    ("tokenizer.json", "invalid JSON ("),
])
def test_cut_short_text_files_are_one_line(cli_error, adapter, tmp_path, name, what):
    bad, _ = _damaged(adapter, tmp_path, name, 0.5)
    msg = cli_error("generate", "--adapter", bad, "--prompt", "hi", "--max-new-tokens", "1")
    assert msg.startswith(f"{bad / name}: ") and what in msg and msg.endswith(FIX), msg


def test_garbage_weights_are_one_line(cli_error, adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    msg = cli_error("merge", bad, "-o", tmp_path / "m")
    assert msg == f"{bad / 'adapter_model.safetensors'}: corrupt safetensors header; {FIX}"
