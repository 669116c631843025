"""The files of the commands that read adapters (generate, merge, eval, combine): a damaged adapter
directory (a file cut short by an interrupted copy or a full disk, or malformed) is one line naming the
file, what is wrong and what to do; an output never overlaps an input, and ``--overwrite`` replaces
only what our commands wrote."""

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
    cut = int(len(data) * keep)
    if 0 < cut < len(data) and data[cut - 1:cut] == b"\n":  # mid-line, as a cut-short file is unless by chance
        cut -= 1
    (bad / name).write_bytes(data[:cut])
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


# ------------------------------------------------------------------ outputs never overlap inputs


@pytest.mark.parametrize("command", ["merge", "combine"])
def test_output_over_the_adapter_is_refused_and_the_adapter_kept(cli_error, adapter, tmp_path, command):
    work = tmp_path / "adapter"
    shutil.copytree(adapter, work)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    args = ["merge", work] if command == "merge" else ["combine", work, work]
    msg = cli_error(*args, "-o", work, "--overwrite")
    assert msg == (f"--output: {work} is the input {work}; writing there would destroy what is being read: "
                   f"choose an output outside the inputs")
    assert cli_error(*args, "-o", work / "inside").startswith(f"--output: {work / 'inside'} lies inside the input")
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_overwrite_never_replaces_a_users_file_or_directory(cli_error, adapter, tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    msg = cli_error("merge", adapter, "-o", user_file, "--overwrite")
    assert msg == f"--output: {user_file} is a file, not an output of qlora-trainer; choose another path " \
                  f"(nothing of yours is replaced)"
    assert user_file.read_text() == "mine"
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "a.txt").write_text("mine")
    msg = cli_error("combine", adapter, adapter, "-o", user_dir, "--overwrite")
    assert msg.startswith(f"--output: {user_dir} was not written by qlora-trainer")
    assert (user_dir / "a.txt").read_text() == "mine"


def test_overwrite_replaces_our_own_output(adapter, tmp_path, capsys):
    from qlora_trainer.cli import main

    out = tmp_path / "combined"
    assert main(["combine", str(adapter), str(adapter), "-o", str(out)]) == 0
    assert (out / ".qlora-trainer-output").is_file()
    assert main(["combine", str(adapter), str(adapter), "-o", str(out), "--overwrite"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "-o", str(merged)]) == 0
    assert main(["merge", str(adapter), "-o", str(merged), "--overwrite"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_eval_output_inside_the_adapter_is_refused_before_loading(cli_error, adapter, tmp_path):
    msg = cli_error("eval", adapter, "--no-tasks", "--perplexity", "--output", adapter / "eval")
    assert msg.startswith(f"--output: {adapter / 'eval'} lies inside the input {adapter}")
