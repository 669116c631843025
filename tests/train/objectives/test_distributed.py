"""DPO and ORPO (a token mean and a pair mean in one loss) under 2-process DDP (gloo, CPU): 2 ranks x 2 micro-batches of 2 pairs per step equal one
process x 4 micro-batches of 2 pairs over the same pairs: step losses and reward metrics (the pair
counts and metric sums are reduced over ranks before dividing)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

RUN = {
    "model": {"name_or_path": "random:tiny", "quantization": "nf4"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "down_proj", "lm_head"]},
    "data": {"path": "builtin:demo-pairs", "format": "preference", "seq_len": 48, "max_samples": 32},
    "train": {"max_steps": 3, "lr": 3e-3, "batch_size": 2, "grad_accum": 2, "seed": 0, "device": "cpu",
              "optimizer": "adamw", "objective": "dpo", "distributed": "ddp"},
    "output": {"progress_bar": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_ddp_two_processes_match_one_process(tmp_path, objective):
    from qlora_trainer.config import load_config
    from qlora_trainer.train import train

    path = tmp_path / "ddp.yaml"
    run = {**RUN, "train": {**RUN["train"], "objective": objective}}
    path.write_text(yaml.safe_dump({**run, "output_dir": str(tmp_path / "ddp")}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "qlora_trainer.cli", "train", str(path), "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = load_config(path, ["train.distributed=none", "train.grad_accum=4", f"output_dir={tmp_path / 'one'}"])
    train(cfg)
    two, one = _rows(tmp_path / "ddp"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a, b)
    assert one[-1]["rewards/margins"] != 0
