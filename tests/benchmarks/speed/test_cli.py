"""``python -m benchmarks.speed`` (the estimate): memory + predicted step for ours and HF; errors are one line; the
trainer's predicted-vs-measured log line."""

from __future__ import annotations

import json
import logging

from benchmarks.speed.__main__ import main
from benchmarks.speed.report import StepTimeCheck


def _cfg(tmp_path, model="llama-2-7b"):
    p = tmp_path / "run.yaml"
    p.write_text(f"model: {{name_or_path: {model}}}\ndata: {{seq_len: 512}}\n"
                 "train: {max_steps: 100, grad_accum: 2}\nlora: {dropout: 0.0}\n")
    return str(p)


def test_estimate_json(tmp_path, capsys):
    assert main([_cfg(tmp_path), "performance.checkpoint_layers=all", "--gpu", "h100", "--json",
                 "--samples", "1000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "prediction" and out["memory"]["total_gb"] > 0 and out["fits"] is True
    assert out["memory_hf"]["allocated_gib"] > out["memory"]["allocated_gib"]     # fp32 upcast, logits
    ours, hf = out["ours"], out["hf"]
    assert ours["tokens_per_s"] > 0 and hf["step_s"] > ours["step_s"]
    assert out["predicted_speedup_vs_hf"] == round(hf["step_s"] / ours["step_s"], 3)
    assert ours["wall_s_max_steps"] == round(100 * ours["step_s"], 1)
    assert out["epoch_steps"] == 500                       # 1000 samples / (batch 1 x grad_accum 2)
    assert hf["dequants"] == 2 * 32 * 7 * 3                # 2 micro-batches, every weight three times
    assert main([_cfg(tmp_path), "data.max_samples=300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch_steps"] == 150   # data.max_samples by default
    # performance.group_projections (on by default) is modelled as the fused q/k/v and gate/up options
    ungrouped = main([_cfg(tmp_path), "performance.group_projections=false", "performance.checkpoint_layers=all",
                      "--gpu", "h100", "--json"])  # like for like with the first call
    assert ungrouped == 0 and json.loads(capsys.readouterr().out)["ours"]["step_s"] > ours["step_s"]


def test_estimate_table_and_errors(tmp_path, capsys):
    assert main([_cfg(tmp_path), "--gpu", "4090"]) == 0
    text = capsys.readouterr().out
    assert "peak memory (estimate)" in text and "| **step** |" in text and "ours/HF speed ratio" in text
    assert main([_cfg(tmp_path), "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err
    assert main([_cfg(tmp_path, "org/private-model")]) == 2
    assert "--arch" in capsys.readouterr().err


def test_step_time_check_logs_measured_beside_predicted(caplog):
    clock = iter([4.0, 10.0])  # read at the end of step 1 and of step 4
    check = StepTimeCheck(1.5, measure=3)
    check._clock = lambda: next(clock)
    with caplog.at_level(logging.INFO, logger="qlora_trainer.train.loop"):
        for _ in range(5):
            check.tick()
    lines = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert lines == ["step time: measured 2.000 s (mean of steps 2-4) vs predicted 1.500 s (+33%)"]


def test_step_time_check_on_cpu_predicts_nothing(caplog):
    import torch

    from qlora_trainer.config import Config

    with caplog.at_level(logging.INFO, logger="qlora_trainer.train.loop"):
        check = StepTimeCheck.start(Config(), torch.device("cpu"))   # no GPU: no GPU-time prediction
        for _ in range(5):
            check.tick()
    assert check.predicted_s is None and not [r for r in caplog.records if "step" in r.getMessage()]


def test_estimate_plans_checkpoint_layers_for_the_gpu(tmp_path, capsys):
    """performance.checkpoint_layers=auto: the estimate plans for the chosen GPU's memory, as the trainer
    does on that GPU: at 7B/4096 an 80 GB H100 recomputes nothing (a faster step, more memory),
    a 24 GB card some layers; a fixed number is taken as given."""
    p = tmp_path / "run.yaml"
    p.write_text("model: {name_or_path: llama-2-7b}\ndata: {seq_len: 4096}\nlora: {dropout: 0.0}\n")
    runs = {}
    for gpu in ("h100", "4090"):
        assert main([str(p), "--gpu", gpu, "--json"]) == 0
        runs[gpu] = json.loads(capsys.readouterr().out)
    h100, small = runs["h100"], runs["4090"]
    assert h100["checkpointed_layers"] == 0 and 0 < small["checkpointed_layers"] < 32
    assert h100["memory"]["total_gb"] > small["memory"]["total_gb"] and small["fits"] is True
    assert h100["ours"]["launches"] < small["ours"]["launches"]   # no recompute launches
    assert main([str(p), "performance.checkpoint_layers=all", "--gpu", "h100", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert every["checkpointed_layers"] == 32 and every["ours"]["step_s"] > h100["ours"]["step_s"]
