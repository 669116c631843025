"""Grouped projections under FSDP2 with checkpointed layers (docs/distributed.md, "Grouped projections").

The failure this pins: FSDP2 all-gathers a 4-bit weight into a plain Parameter without bitsandbytes'
``quant_state``; only the 4-bit layer's own forward pre-hook put it back. Grouped q/k/v (gate/up)
never call the members' forward, so in a layer's first forward the group saw no quant state and
fell back to member-wise LoRA (50 saved tensors), the fallback's member forwards re-attached the
state, and the checkpoint's recompute then grouped (41): torch's CheckpointError. Our kernels now
read the layer's kept quant state (``kernels.base_weight.quant_state_of``), so both passes group.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_grouped_worker import batch_for, grouped_step, tiny_grouped_model  # noqa: E402

WORKER = Path(__file__).parent / "fsdp_grouped_worker.py"


def _assert_same_step(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)
    assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) > 0
    for k, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, rtol=1e-5, atol=1e-7, msg=k)


def _assert_grouped_in_forward_and_recompute(groups: list, n_layers: int) -> None:
    """Every call grouped: 2 groups per layer in the forward, again in the recompute; in the first
    forward the gathered weights had lost their quant state (the FSDP condition is exercised)."""
    assert len(groups) == 2 * 2 * n_layers
    assert all(grouped for _, grouped, _ in groups)
    assert groups[0][2] > 0


def test_grouped_projections_under_fsdp_world_size_one_equal_unsharded():
    """fully_shard on every layer (a process group of one): the checkpointed step groups q/k/v and
    gate/up in the forward and the recompute (no saved-tensor mismatch) and equals the unsharded one."""
    import torch.distributed as dist

    from qlora_trainer.train.distributed import _single_process_group

    batch = batch_for(0)
    plain = grouped_step(tiny_grouped_model(), batch, shard=False)
    model = tiny_grouped_model()
    _single_process_group(torch.device("cpu"))
    try:
        sharded = grouped_step(model, batch, shard=True)
    finally:
        dist.destroy_process_group()
    n_layers = len(model.model.layers)
    _assert_grouped_in_forward_and_recompute(sharded["groups"], n_layers)
    assert all(grouped for _, grouped, _ in plain["groups"]) and len(plain["groups"]) == 4 * n_layers
    _assert_same_step(sharded, plain)


# two fresh interpreters (torch, transformers, bitsandbytes): ~20 s on 2 cores
def test_grouped_projections_under_fsdp_two_processes_gloo(tmp_path):
    """2 ranks over gloo, each layer sharded across both: each rank's grouped, checkpointed step
    (LoRA tensors replicated, grads not yet averaged) equals the one-process step on its batch."""
    with socket.socket() as sock:  # a free port (torchrun's 0 does not pick one)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(WORKER), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    n_layers = len(tiny_grouped_model().model.layers)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_grouped_in_forward_and_recompute(got["groups"], n_layers)
        _assert_same_step(got, grouped_step(tiny_grouped_model(), batch_for(rank), shard=False))


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
