"""One grouped-projection training step of the tiny NF4 + LoRA model, sharded by FSDP2 or not.

Imported by tests/train/test_fsdp_grouped.py (world size 1, in process) and run as a script under
``torch.distributed.run`` (2 processes, gloo): ``python -m torch.distributed.run --nproc_per_node 2
fsdp_grouped_worker.py OUT_DIR`` writes ``OUT_DIR/rank<r>.pt`` = :func:`grouped_step`'s result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SEQ = 40


def tiny_grouped_model(seed: int = 0) -> torch.nn.Module:
    """The tiny NF4 model (fp32 packed storage, as FSDP needs on the CPU) with LoRA r=4 on every
    linear, q/k/v and gate/up grouped, every decoder layer checkpointed (non-reentrant)."""
    from qlora_trainer.config import Config
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.train import prepare_model
    from qlora_trainer.train.setup import grouped_projections_on

    cfg = Config()
    cfg.lora.r, cfg.lora.dropout, cfg.lora.dtype = 4, 0.0, "float32"
    cfg.performance.kernels, cfg.data.seq_len = "torch", SEQ
    cfg.train.distributed, cfg.quantization.quant_storage = "fsdp", "float32"
    assert grouped_projections_on(cfg, training=True)
    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    model = synthetic_nf4_model("tiny", device=cpu, compute_dtype=torch.float32, quant_storage=torch.float32)
    return prepare_model(model, cfg, device=cpu, dtype=torch.float32)


def batch_for(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s micro-batch: (1, SEQ) token ids, labels = ids."""
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    return {"input_ids": ids, "labels": ids.clone()}


def grouped_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], shard: bool) -> dict:
    """Forward + backward of ``batch`` (``shard``: through FSDP2 ``fully_shard`` on every layer, as
    the trainer does). Returns {"loss": () fp32, "grads": {name: grad} of the LoRA tensors,
    "groups": [(grad enabled, grouped?, members whose weight had lost its quant_state)] per
    ``grouped_projections`` call}: the forward's calls, then the recompute's."""
    import qlora_trainer.kernels.grouped_linear as gl
    import importlib

    import qlora_trainer.models.adapt as ad

    # the module, not the package attribute of the same name (``qlora_trainer.kernels.swiglu`` is the function)
    from qlora_trainer.train.distributed import LossModule, shard_fsdp

    sw = importlib.import_module("qlora_trainer.kernels.swiglu")

    engine = LossModule(model, backend="torch")
    if shard:
        engine = shard_fsdp(engine, model, torch.float32, torch.device("cpu"))
    calls, orig = [], ad.grouped_projections  # spied where it is called (attention, MLP)

    def spy(x, owner, name, modules):
        lost = sum(getattr(m.base_layer.weight, "quant_state", None) is None for m in modules)
        out = orig(x, owner, name, modules)
        calls.append((torch.is_grad_enabled(), out is not None, lost))
        return out

    gl.grouped_projections = ad.grouped_projections = sw.grouped_projections = spy
    try:
        loss, n = engine(batch)
        (loss / n).backward()
    finally:
        gl.grouped_projections = ad.grouped_projections = sw.grouped_projections = orig
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "groups": calls}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        result = grouped_step(tiny_grouped_model(), batch_for(rank), shard=True)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
