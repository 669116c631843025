"""Faults during a run: a non-finite step, a damaged newest checkpoint, a truncated metrics line, a
changed config or dataset on resume, a full disk, SIGTERM while loading, leftovers of a killed run.
Each ends as documented in docs/faults.md: one ``error:`` line (no traceback) or a warning and the
correct result, with nothing finished lost."""

from __future__ import annotations

import copy
import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from qlora_trainer.config import save_config
from qlora_trainer.errors import QloraError
from qlora_trainer.train import recipe, train


def _yaml(cfg, path: Path) -> Path:
    save_config(cfg, path)
    return path


def _strict_rows(out: Path) -> list[dict]:
    def no_constant(c):
        raise AssertionError(f"metrics.jsonl holds {c}, which is not JSON")
    return [json.loads(ln, parse_constant=no_constant) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _strict_rows(out) if "loss" in r}


def _nan_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the loss of the given causal_lm_loss calls (2 per step here) NaN."""
    real, n = recipe.causal_lm_loss, {"calls": 0}

    def nan_loss(*args, **kwargs):
        n["calls"] += 1
        loss, count = real(*args, **kwargs)
        return (loss * float("nan"), count) if n["calls"] in calls else (loss, count)

    monkeypatch.setattr(recipe, "causal_lm_loss", nan_loss)


# ---------------------------------------------------------------------------------------- non-finite


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_step(cli_error, tiny_cfg, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {5})  # step 3's first micro-batch
    msg = cli_error("train", _yaml(tiny_cfg, tmp_path / "c.yaml"))
    assert msg.startswith("train: step 3: loss nan and gradient norm nan; stopped without applying it (the last "
                          "good step is 2): lower train.lr") and "train.skip_bad_steps=N" in msg
    out = Path(tiny_cfg.output_dir)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # saved on the way out
    assert not (out / "adapter").exists()
    assert list(_losses(out)) == [1, 2]  # strict JSON, nothing logged for the bad step


def test_skip_bad_steps_skips_and_finishes_with_a_finite_adapter(tiny_cfg, monkeypatch, caplog):
    from safetensors.torch import load_file

    _nan_loss_at(monkeypatch, {5})
    tiny_cfg.train.skip_bad_steps = 1
    with caplog.at_level(logging.WARNING):
        res = train(tiny_cfg)
    assert "step 3: loss nan and gradient norm nan; skipped (1 of train.skip_bad_steps=1)" in caplog.text
    assert res.step == 4 and list(_losses(Path(tiny_cfg.output_dir))) == [1, 2, 3, 4]
    weights = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_nan_weights_are_never_saved(tiny_cfg):
    from qlora_trainer.train.checkpoint import TrainerState, save_checkpoint
    from qlora_trainer.train.guards import NonFiniteError
    from tests.train.test_checkpoint import _model_and_opt

    model, opt, sched = _model_and_opt(tiny_cfg)
    next(p for p in model.parameters() if p.requires_grad).data[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"after step 7 the trainable weight .* is not finite"):
        save_checkpoint(model, opt, sched, TrainerState(step=7), tiny_cfg)
    assert not (Path(tiny_cfg.output_dir) / "checkpoints").exists()


# -------------------------------------------------------------------------------------------- resume


def test_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(tiny_cfg, tmp_path, caplog):
    """Pre-empted after step 3 (checkpoints 1-3), then step-3's optimizer.pt is truncated and the last
    metrics line is cut mid-write: resume=auto warns, moves step-3 aside, resumes from step-2, and the
    losses match an uninterrupted run bit for bit."""
    tiny_cfg.train.save_every = 1
    full, part = copy.deepcopy(tiny_cfg), copy.deepcopy(tiny_cfg)
    full.output_dir, part.output_dir = str(tmp_path / "full"), str(tmp_path / "part")
    train(full)
    train(part, stop_after=3)
    out = Path(part.output_dir)
    opt = out / "checkpoints" / "step-3" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.')  # a kill in the middle of a metrics write
    part.resume = "auto"
    with caplog.at_level(logging.WARNING):
        res = train(part)
    assert "step-3 is damaged (optimizer.pt has 100 bytes, the manifest says" in caplog.text
    assert res.resumed_from.name == "step-2" and (out / "checkpoints" / "step-3.damaged").is_dir()
    assert _losses(out) == _losses(Path(full.output_dir))


def test_verify_names_what_is_wrong(tiny_cfg):
    from qlora_trainer.train.checkpoint import TrainerState, save_checkpoint
    from qlora_trainer.train.resume import verify
    from tests.train.test_checkpoint import _model_and_opt

    model, opt, sched = _model_and_opt(tiny_cfg)
    path = save_checkpoint(model, opt, sched, TrainerState(step=1), tiny_cfg)
    assert verify(path) is None
    rng = path / "rng.pt"
    data = bytearray(rng.read_bytes())
    data[-30] ^= 0xFF
    rng.write_bytes(bytes(data))
    assert verify(path) == "rng.pt does not match its checksum"
    (path / "adapter" / "adapter_model.safetensors").unlink()
    assert verify(path) == "adapter/adapter_model.safetensors is missing"


def test_explicit_damaged_checkpoint_and_no_complete_one_are_errors(cli_error, tiny_cfg, tmp_path):
    tiny_cfg.output.keep_last = 1
    train(tiny_cfg, stop_after=1)
    ckpt = Path(tiny_cfg.output_dir) / "checkpoints" / "step-1"
    (ckpt / "trainer_state.json").write_text("{")
    cfg_file = _yaml(tiny_cfg, tmp_path / "c.yaml")
    msg = cli_error("train", cfg_file, f"resume={ckpt}")
    assert msg.startswith(f"resume: checkpoint {ckpt} is damaged (trainer_state.json has 1 bytes")
    msg = cli_error("train", cfg_file, "resume=auto")
    assert msg.startswith("resume: no complete checkpoint in") and "output.overwrite=true" in msg


def test_resume_with_changed_config_lists_the_differences(cli_error, tiny_cfg, tmp_path):
    train(tiny_cfg, stop_after=1)
    cfg_file = _yaml(tiny_cfg, tmp_path / "c.yaml")
    msg = cli_error("train", cfg_file, "resume=auto", "lora.r=8", "train.batch_size=1", "train.seed=1",
                    "train.max_steps=6")  # max_steps may change: not listed
    ckpt = Path(tiny_cfg.output_dir) / "checkpoints" / "step-1"
    assert msg == (f"resume: this run differs from checkpoint {ckpt}: lora.r: 4 -> 8; train.batch_size: 2 -> 1; "
                   f"train.seed: 0 -> 1; restore those values, or set resume_allow_changes=true to continue anyway")
    tiny_cfg.resume, tiny_cfg.resume_allow_changes, tiny_cfg.lora.r = "auto", True, 8
    with pytest.raises(QloraError, match=r"checkpoint tensor shapes differ .* \(4, 128\) vs \(8, 128\)"):
        train(tiny_cfg)  # allowed, but a rank change cannot load: one line, not a shape traceback
    tiny_cfg.lora.r, tiny_cfg.train.lr = 4, 1e-3
    assert train(tiny_cfg).resumed_from == ckpt  # the user who means it


def test_resume_on_changed_data_is_refused(cli_error, tiny_cfg, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"{i} {i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_cfg.data.path, tiny_cfg.data.max_samples = str(data), None
    train(tiny_cfg, stop_after=1)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # same path, same size, new order
    msg = cli_error("train", _yaml(tiny_cfg, tmp_path / "c.yaml"), "resume=auto")
    assert "resume: this run differs from checkpoint" in msg and ": training data fingerprint " in msg


# ------------------------------------------------------------------------------------------- litter


def test_our_temporaries_are_removed_and_user_files_kept(tiny_cfg, monkeypatch):
    from qlora_trainer.lora import peft_format

    out = Path(tiny_cfg.output_dir)
    ours = [out / "checkpoints" / ".step-3.a1b2c3.tmp", out / "checkpoints" / ".step-2.deleting",
            out / ".adapter.x9y8.tmp", out / ".adapter.q7r6"]
    for d in ours:
        (d / "optimizer.pt").parent.mkdir(parents=True)
        (d / "optimizer.pt").write_bytes(b"0" * 1000)
    (out / ".metrics.jsonl.k3j2.tmp").write_text("{}")
    (out / "adapter").mkdir()  # an adapter directory of ours (overwrite) with a half-written file replacement
    (out / "adapter" / ".adapter_model.safetensors.ab12cd34.tmp").write_bytes(b"0" * 100)
    tiny_cfg.output.overwrite = True
    mine = [out / "notes.txt", out / ".step-9.tmp", out / "checkpoints" / "README"]
    for f in mine:
        f.write_text("mine")
    real = peft_format.save_adapter

    def leaves_staging(model, out_dir, **kw):  # a temporary appearing during the run is gone at the end
        Path(out_dir).parent.joinpath(".adapter.late1.tmp").mkdir(exist_ok=True)
        return real(model, out_dir, **kw)

    monkeypatch.setattr("qlora_trainer.train.recipe.save_adapter", leaves_staging)
    train(tiny_cfg)
    assert not [p for p in ours + [out / ".metrics.jsonl.k3j2.tmp", out / ".adapter.late1.tmp",
                                   out / "adapter" / ".adapter_model.safetensors.ab12cd34.tmp"] if p.exists()]
    assert all(f.read_text() == "mine" for f in mine)


# ---------------------------------------------------------------------------------------- disk full


def _full_disk_on(monkeypatch, target: str, exc: Exception) -> None:
    if target == "checkpoint":
        real = torch.save

        def save(obj, f, *a, **k):
            if Path(f).name == "optimizer.pt" and ".step-2." in str(f):
                raise exc
            return real(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", save)
    elif target == "adapter":
        import safetensors.torch

        real_sf = safetensors.torch.save_file

        def save_file(tensors, filename, *a, **k):
            if "checkpoints" not in str(filename):
                raise exc
            return real_sf(tensors, filename, *a, **k)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:  # a metrics line
        real_open = open

        def fake_open(file, mode="r", *a, **k):
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                raise exc
            return real_open(file, mode, *a, **k)
        monkeypatch.setattr("builtins.open", fake_open)


@pytest.mark.parametrize("target,exc,where", [
    ("checkpoint", OSError(errno.ENOSPC, "No space left on device"), "checkpoints/step-2"),
    ("adapter", RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                             "\"No space left on device\" })"), "adapter"),
    ("metrics", OSError(errno.EDQUOT, "Disk quota exceeded"), "metrics.jsonl"),
])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(cli_error, tiny_cfg, tmp_path, monkeypatch,
                                                                  target, exc, where):
    tiny_cfg.train.save_every = 1
    cfg_file = _yaml(tiny_cfg, tmp_path / "c.yaml")
    _full_disk_on(monkeypatch, target, exc)
    out = Path(tiny_cfg.output_dir)
    msg = cli_error("train", cfg_file)
    assert msg.startswith(f"no space left on device writing {out / where}; free some space and run again")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    kept = {"checkpoint": ["step-1"], "adapter": ["step-1", "step-2", "step-3", "step-4"], "metrics": []}
    assert ckpts == kept[target]  # complete checkpoints only: no step-2 temporary, nothing half-written
    assert not (out / "adapter").exists()


# -------------------------------------------------------------------------------- SIGTERM, demo


def test_sigterm_while_loading_exits_143_with_a_message(tiny_cfg, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import qlora_trainer.train.recipe as recipe
    from qlora_trainer.cli import main

    def killed(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not interrupt loading")

    monkeypatch.setattr(recipe, "load_base_model", killed)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["train", str(_yaml(tiny_cfg, tmp_path / "c.yaml"))]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not (Path(tiny_cfg.output_dir) / "checkpoints").exists()


def test_rerunning_the_demo_config_never_destroys_the_finished_run(cli_error, tmp_path):
    from qlora_trainer.config import load_config

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert load_config(demo).output.overwrite is False
    args = ["train", demo, "train.max_steps=1", "data.max_samples=16", "output.progress_bar=false",
            f"output_dir={tmp_path / 'demo'}"]
    from qlora_trainer.cli import main

    assert main([str(a) for a in args]) == 0
    adapter = tmp_path / "demo" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    msg = cli_error(*args)
    assert msg == f"output_dir: '{tmp_path / 'demo'}' already holds a finished adapter; set resume=auto (with a " \
                  f"larger train.max_steps or train.epochs) to continue it, output.overwrite=true to start over, " \
                  f"or pick another output_dir"
    assert adapter.read_bytes() == before


@pytest.mark.slow
def test_kill_9_then_damaged_newest_checkpoint_resumes_from_the_one_before(tiny_cfg, tmp_path):
    """A real ``kill -9`` of the CLI once step-3 is on disk; the newest checkpoint then loses its
    adapter weights; resume=auto continues from the checkpoint before it and logs the uninterrupted
    run's losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tiny_cfg.train.max_steps, tiny_cfg.train.save_every = 8, 1
    full = copy.deepcopy(tiny_cfg)
    full.output_dir = str(tmp_path / "full")
    train(full)
    out = Path(tiny_cfg.output_dir)
    cfg_file = _yaml(tiny_cfg, tmp_path / "c.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "qlora_trainer.cli", "train", str(cfg_file), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-3").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = sorted((p for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit()),
                    key=lambda p: int(p.name[5:]))
    assert len(newest) >= 2, "killed too late or too early"
    assert (out / ".lock").is_file()  # the killed run's lock: stale, taken over by the resume
    (newest[-1] / "adapter" / "adapter_model.safetensors").unlink()
    tiny_cfg.resume = "auto"
    res = train(tiny_cfg)
    assert res.resumed_from == newest[-2] and not (out / ".lock").exists()
    assert _losses(out) == _losses(Path(full.output_dir))


def test_damaged_file_of_a_checkpoint_without_manifest_is_one_line(cli_error, tiny_cfg, tmp_path):
    """A checkpoint of an earlier version (no manifest to verify) with a cut-short optimizer.pt, named
    explicitly: one line naming the file and pointing at an earlier checkpoint."""
    tiny_cfg.train.save_every = 1
    train(tiny_cfg, stop_after=2)
    ckpt = Path(tiny_cfg.output_dir) / "checkpoints" / "step-2"
    (ckpt / "manifest.json").unlink()
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    tiny_cfg.resume = str(ckpt)
    msg = cli_error("train", _yaml(tiny_cfg, tmp_path / "c.yaml"))
    assert msg.startswith(f"{ckpt / 'optimizer.pt'}: cannot be loaded (") and msg.endswith(
        "; resume from an earlier checkpoint (resume=auto skips damaged ones; or resume=PATH/step-N) or start "
        "over with output.overwrite=true"), msg
