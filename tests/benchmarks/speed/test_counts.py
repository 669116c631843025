"""The speed model's counts equal those of one real training step: the model and the code cannot drift.

One optimizer step of an NF4 + LoRA model with the tiny model's proportions runs on the CPU through
our kernels (Triton interpreter); a ``TorchDispatchMode`` counts the aten GEMMs (and their FLOPs
from the operand shapes) and dropout-mask draws, and wrappers count every Triton launcher call
(dequant, RMSNorm, RoPE, SwiGLU, cross-entropy, LoRA dropout). ``recipes.step_ops`` must predict the same numbers.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from qlora_trainer.models.catalog import CATALOG
from benchmarks.speed.counting import LAUNCHERS, StepCounter
from benchmarks.speed.recipes import StepOptions, step_ops

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

def _real_step(seq: int, dropout: float, mlp_chunk: int, backend: str = "triton", arch=None,
               nf4_matmul: tuple[str, int] | None = None, out: dict | None = None) -> tuple[Counter, StepCounter]:
    import importlib

    from qlora_trainer.config import Config
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.train import build_optimizer, causal_lm_loss, prepare_model

    arch = arch or CATALOG["tiny"]
    cfg = Config()
    cfg.lora.r, cfg.lora.dropout, cfg.lora.dtype = 8, dropout, "float32"
    cfg.train.optimizer, cfg.data.seq_len = "adamw", seq
    cfg.performance.kernels, cfg.performance.mlp_chunk_tokens = backend, mlp_chunk
    cfg.performance.group_projections = False  # grouping's counts: tests/train/test_step_counts.py
    cpu = torch.device("cpu")
    torch.manual_seed(0)  # the same weights and adapters on every call
    model = prepare_model(synthetic_nf4_model(arch, device=cpu, compute_dtype=torch.float32), cfg,
                          device=cpu, dtype=torch.float32)
    if nf4_matmul is not None:  # (path, chunk bytes): what performance.nf4_matmul sets, with small chunks
        from qlora_trainer.kernels.base_weight import set_nf4_matmul

        set_nf4_matmul(model, *nf4_matmul)
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, arch.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    mode = StepCounter()
    nf4 = importlib.import_module("qlora_trainer.kernels.nf4")
    ref = nf4.dequantize_nf4_reference

    def counted(*a, **k):  # the torch reference's ops are launches: counted by the mode as well
        mode.launches["dequant.reference"] += 1
        return ref(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(nf4, "dequantize_nf4_reference", counted)
    try:
        with mode:
            loss, n = causal_lm_loss(model, batch, backend=backend)
            (loss / n).backward()
    finally:
        mp.undo()
    launches = mode.launches
    if out is not None:  # the step's loss, adapter gradients and (below) adapters after the update
        out["loss"] = loss.detach()
        out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()  # runs (the step is whole) but is not counted: CPU torch AdamW is not the CUDA one
    opt.zero_grad(set_to_none=True)
    if out is not None:
        out["params"] = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return launches, mode


def _options(seq: int, dropout: float, mlp_chunk: int, kernels: bool = True, **extra) -> StepOptions:
    return StepOptions(seq_len=seq, lora_r=8, dropout=dropout, act_bytes=4, optimizer="adamw", mlp_chunk=mlp_chunk,
                       kernels=kernels, **extra)


def _predicted(seq: int, dropout: float, mlp_chunk: int, arch=None, **extra) -> dict:
    ops = step_ops(arch or CATALOG["tiny"], _options(seq, dropout, mlp_chunk, **extra))
    by = Counter()
    for op in ops:
        key = "rope" if op.name.startswith("rope.") else op.name
        by[key] += op.count
    gemm = [op for op in ops if op.kind == "gemm" and not op.name.endswith(".fused")]
    by["fused"] = sum(op.count for op in ops if op.name.endswith(".fused"))  # Triton NF4 GEMMs
    return {"launches": by, "gemms": sum(op.count for op in gemm), "flops": sum(op.total_flops for op in gemm),
            "dropout": by["lora.dropout"]}


@pytest.mark.parametrize("seq,dropout,mlp_chunk", [(96, 0.0, 0), pytest.param(96, 0.1, 0, marks=pytest.mark.slow),
                                                    pytest.param(96, 0.1, 32, marks=pytest.mark.slow)])
def test_model_counts_equal_a_real_step(seq, dropout, mlp_chunk):
    launches, mode = _real_step(seq, dropout, mlp_chunk)
    pred = _predicted(seq, dropout, mlp_chunk)
    for label in ("dequant", "fused", "rmsnorm.fwd", "rmsnorm.bwd", "add_rmsnorm.fwd", "add_rmsnorm.bwd", "rope",
                  "swiglu.fwd", "swiglu.bwd", "ce.chunk"):
        assert launches[label] == pred["launches"][label], label
    assert mode.gemms == pred["gemms"]
    assert mode.flops == pytest.approx(pred["flops"], rel=1e-9)
    assert mode.bernoulli == 0 and launches["lora.dropout"] == pred["dropout"]  # the device-seeded Triton kernel
    # every launch (aten ops outside the launchers + Triton launches) of forward + backward
    real = sum(mode.aten.values()) + sum(launches.values())
    modelled = sum(op.total_launches for op in step_ops(CATALOG["tiny"], _options(seq, dropout, mlp_chunk))
                   if op.phase != "optimizer")
    print(f"tiny step: {real} launches, {modelled} modelled")
    assert modelled == pytest.approx(real, rel=0.05)
    if not mlp_chunk:  # 4 layers x 7 linears, dequantized in forward, recompute and backward, except
        # layer 0's q/k/v dx (its input needs no grad) and down_proj in each recompute (recompute_skips_base)
        assert launches["dequant"] == 3 * 28 - 3 - 4
        assert launches["fused"] == 0            # 96 tokens > DECODE_MAX_TOKENS: dequant + cuBLAS
    else:  # 32-token chunks take the fused NF4 GEMM (<= 64 tokens); per layer, of gate/up/down:
        # forward 3 chunks x 3; the layer's recompute runs 2 chunks whole (early stop at the third's
        # checkpoint); each chunk's own recompute 3 x 2 (down_proj skipped); backward dx 3 x 3
        assert launches["fused"] == 4 * (3 * 3 + 2 * 3 + 3 * 2 + 3 * 3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_counts_equal_a_real_step_with_the_torch_references(dropout):
    """``performance.kernels: torch``: every kernel is its torch reference (the dequantization 13 aten ops,
    RMSNorm 6 + 12, RoPE 10 + 10, SwiGLU 2 + 3, the loss chunk 15, LoRA dropout's Philox 126 + 2)."""
    launches, mode = _real_step(96, dropout, 0, backend="torch")
    ops = step_ops(CATALOG["tiny"], _options(96, dropout, 0, kernels=False))
    assert sum(launches[k] for k in LAUNCHERS.values()) == 0              # no Triton at all
    assert launches["dequant.reference"] == sum(op.count for op in ops if op.kind == "dequant") == 77
    gemm = [op for op in ops if op.kind == "gemm"]
    assert mode.gemms == sum(op.count for op in gemm)
    assert mode.flops == pytest.approx(sum(op.total_flops for op in gemm), rel=1e-9)
    real = sum(mode.aten.values())
    modelled = sum(op.total_launches for op in ops if op.phase != "optimizer")
    print(f"tiny step, torch references: {real} launches, {modelled} modelled")
    assert modelled == pytest.approx(real, rel=0.05)


def test_fused_add_norm_model_saves_a_launch_per_layer_pass():
    """performance.fused_add_norm: one launch fewer per layer in forward, recompute and backward, and one
    more in the backward of every layer but the first (the input norm sums the residual gradient;
    the drift tests above check the fused counts against a real step, test_step_counts the
    unfused), less traffic; with the torch references the ops are the unfused ones."""
    from dataclasses import replace

    arch, on = CATALOG["tiny"], _options(96, 0.0, 0)

    def total(o, attr):
        return sum(getattr(op, attr) for op in step_ops(arch, o))

    off = replace(on, fused_add_norm=False)
    assert total(off, "total_launches") - total(on, "total_launches") == 3 * arch.layers + arch.layers - 1
    assert total(on, "total_bytes") < total(off, "total_bytes")
    ref = replace(on, kernels=False)
    assert step_ops(arch, ref) == step_ops(arch, replace(ref, fused_add_norm=False))

def test_each_nf4_matmul_path_counts_as_modelled_and_steps_like_the_default():
    """``performance.nf4_matmul`` dequant, chunked (16 KiB chunks: 2-11 per weight) and fused, one
    training step each of a 1-layer tiny model (96 tokens > DECODE_MAX_TOKENS): dequant launches,
    fused GEMMs, aten GEMMs and their FLOPs equal the model's exactly, all launches within 5% and
    the launches a path adds or removes exactly;
    the loss, every adapter gradient and the adapters after the optimizer step equal the default's."""
    from dataclasses import replace

    from qlora_trainer.config import Config

    arch = replace(CATALOG["tiny"], layers=1)
    runs = {}
    for path, chunk in (("dequant", 0), ("chunked", 16384), ("fused", 0)):
        runs[path] = out = {}
        launches, mode = _real_step(96, 0.0, 0, arch=arch, nf4_matmul=(path, chunk or 1 << 23), out=out)
        extra = {"nf4_chunk_bytes": chunk, "fused_dequant_gemm": path == "fused"}
        pred = _predicted(96, 0.0, 0, arch=arch, **extra)
        for label in ("dequant", "fused"):
            assert launches[label] == pred["launches"][label], (path, label)
        assert mode.gemms == pred["gemms"] and mode.flops == pytest.approx(pred["flops"], rel=1e-9), path
        ops = step_ops(arch, _options(96, 0.0, 0, **extra))
        modelled = sum(op.total_launches for op in ops if op.phase != "optimizer")
        out["gap"] = mode.total_launches - modelled  # the rest of the step's (path-independent) gap
        print(f"{path}: {dict(launches)}, {mode.gemms} GEMMs, {mode.total_launches} launches, {modelled} modelled")
        linears = 3 * 7 - 3 - 1  # forward, recompute, dx; minus q/k/v dx (layer 0) and down_proj's recompute
        if path == "dequant":
            assert launches["dequant"] == linears and launches["fused"] == 0
        elif path == "chunked":
            assert launches["fused"] == 0 and launches["dequant"] > 2 * linears
        else:
            assert launches["fused"] == linears and launches["dequant"] == 0
    want = runs["dequant"]
    assert abs(want["gap"]) <= 0.05 * 150  # ~150 launches in all
    for path in ("chunked", "fused"):
        got = runs[path]
        assert got["gap"] == want["gap"], path  # the path's own launches are modelled exactly
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)
        assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) == 2 * 7
        for k, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"{path} grad {k}")
        for k, p in want["params"].items():  # AdamW's first step moves each element by ~lr * sign(g):
            diff = (got["params"][k] - p).abs()  # a gradient within rounding of 0 may flip its sign
            assert diff.max() <= 2 * Config().train.lr + 1e-7 and (diff <= 1e-6).float().mean() > 0.99, (path, k)
