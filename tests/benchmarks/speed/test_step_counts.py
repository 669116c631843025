"""Dequantizations, base GEMMs and launches of one training step of the tiny NF4 + LoRA model.

Counting is ``benchmarks.speed.counting.StepCounter``, the same one the step model's drift test
(tests/benchmarks/speed/test_counts.py) uses, so the model and docs/speed.md read the same numbers: wrappers
count every Triton launcher call, and a ``TorchDispatchMode`` the aten ops outside them. The
before/after table in docs/speed.md comes from :func:`count_step` (run this file with ``-s``).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.speed.counting import StepCounter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

def tiny_model(seq: int = 96, kernels: str = "triton", dropout: float = 0.0, **model_keys):
    """The tiny NF4 + LoRA (r=8, fp32) model prepared as the trainer does, and a batch of ``seq``
    tokens; ``model_keys`` are ``cfg.performance`` / ``cfg.model`` overrides. Same weights and batch on every call."""
    from qlora_trainer.config import Config
    from qlora_trainer.models.catalog import CATALOG
    from qlora_trainer.models.synthetic import synthetic_nf4_model
    from qlora_trainer.train import prepare_model

    arch = CATALOG["tiny"]
    cfg = Config()
    cfg.lora.r, cfg.lora.dropout, cfg.lora.dtype = 8, dropout, "float32"
    cfg.data.seq_len, cfg.performance.kernels = seq, kernels
    for k, v in model_keys.items():
        setattr(cfg.performance if hasattr(cfg.performance, k) else cfg.model, k, v)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = prepare_model(synthetic_nf4_model(arch, device=cpu, compute_dtype=torch.float32), cfg,
                          device=cpu, dtype=torch.float32)
    ids = torch.randint(0, arch.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids.clone()}


def step_grads(model, batch, backend: str = "torch") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every adapter gradient of one forward + backward (dropout seeds fixed)."""
    from qlora_trainer.train import causal_lm_loss

    torch.manual_seed(1)
    loss, n = causal_lm_loss(model, batch, backend=backend)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def count_step(seq: int = 96, kernels: str = "triton", **model_keys) -> dict[str, int]:
    """Forward + backward of one micro-batch of ``seq`` tokens (Triton kernels under the
    interpreter, or the torch references; fp32, r=8, no dropout); ``model_keys`` are ``cfg.model``
    overrides. Returns {"dequant" (NF4 decodes, counted by the base-weight object), "gemm" (aten
    GEMMs), "launches" (aten ops + Triton launches), <each Triton label>}."""
    from qlora_trainer.kernels.base_weight import COUNTS
    from qlora_trainer.train import causal_lm_loss

    model, batch = tiny_model(seq, kernels=kernels, **model_keys)
    COUNTS.clear()
    with StepCounter() as mode:
        loss, n = causal_lm_loss(model, batch, backend=kernels)
        (loss / n).backward()
    launches = mode.launches
    if kernels == "triton":
        assert launches["dequant"] == COUNTS["dequant"]
    return {"dequant": COUNTS["dequant"], "gemm": mode.gemms, "flops": mode.flops,
            "launches": mode.total_launches, **launches}


def _set_base_last(model, on: bool) -> int:
    from qlora_trainer.lora.layer import LoRALinear

    layers = [m for n, m in model.named_modules() if isinstance(m, LoRALinear) and n.endswith("mlp.down_proj")]
    for m in layers:
        m.recompute_skips_base = on
    return len(layers)


def test_recompute_skips_down_proj_base_matmul():
    """Checkpointed layers: the backward's recompute runs every base matmul but down_proj's (its
    output feeds only the residual add), counted in the base-weight object; the step is equal to
    the unskipped one within fp32 rounding (one extra rounding of the sum)."""
    from qlora_trainer.kernels.base_weight import COUNTS

    model, batch = tiny_model(kernels="torch", dropout=0.1)
    n_layers = _set_base_last(model, True)
    assert n_layers == 4  # prepare_model -> apply_checkpointing marked them
    result = {}
    for on in (False, True):
        _set_base_last(model, on)
        COUNTS.clear()
        result[on] = step_grads(model, batch)
        result[on] += (dict(COUNTS),)
    linears = 7 * n_layers
    off, on = result[False][2], result[True][2]
    assert off["forward"] == 2 * linears and off["dx"] == linears - 3  # layer 0's q/k/v: no input grad
    assert on["forward"] == 2 * linears - n_layers and on["dx"] == off["dx"]
    assert on["dequant"] == off["dequant"] - n_layers
    torch.testing.assert_close(result[True][0], result[False][0], rtol=1e-6, atol=0)
    assert result[True][1].keys() == result[False][1].keys()
    for k, g in result[False][1].items():
        torch.testing.assert_close(result[True][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_base_last_saves_the_same_tensors():
    """The reordered down_proj keeps exactly the tensors the fused one keeps (saved-tensor hooks
    over one decoder layer's forward, outside any checkpoint)."""
    model, batch = tiny_model(seq=40, kernels="torch", gradient_checkpointing=False)
    layer = model.model.layers[1]
    h = torch.randn(1, 40, model.config.hidden_size, requires_grad=True)
    pos = torch.arange(40)[None]
    emb = model.model.rotary_emb(h, pos)
    saved = {}
    for on in (False, True):
        _set_base_last(model, on)
        seen: list[int] = []

        def pack(t, seen=seen):
            seen.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(h, position_embeddings=emb, position_ids=pos)
        saved[on] = seen
    assert sum(saved[True]) == sum(saved[False]) > 0
    assert sorted(saved[True]) == sorted(saved[False])


# docs/speed.md: one step of the tiny model, 96 tokens, every layer checkpointed (the default).
BEFORE = {"dequant": 81, "gemm": 304, "launches": 560}  # e264338 (3 x 28 - 3 dequantizations)
AFTER = {"dequant": 43, "gemm": 220, "launches": 493}   # + recompute skip + grouped q/k/v, gate/up + fused add-norm
UNFUSED_ADD_NORM = 508  # launches with performance.fused_add_norm: false (grouped, recompute skip)


def test_step_counts_torch_backend():
    """Dequantizations and GEMMs do not depend on the backend: the fast torch path checks them.
    Grouped, a group's members decode in one call: per layer 7 -> 4 decodes in the forward and dx,
    6 -> 3 in the recompute (down_proj skipped), layer 0's q/k/v group has no dx."""
    got = count_step(kernels="torch")
    assert (got["dequant"], got["gemm"]) == (AFTER["dequant"], AFTER["gemm"])
    assert got["dequant"] == 4 * (4 + 3 + 4) - 1 and got["gemm"] < BEFORE["gemm"]
    off = count_step(kernels="torch", group_projections=False)
    assert off["dequant"] == BEFORE["dequant"] - 4 and off["gemm"] == BEFORE["gemm"] - 4  # down_proj W x, recompute


def _grouped_model(kernels: bool) -> dict:
    """The step model's prediction for count_step's grouped step: fused_qkv / fused_gate_up (what
    performance.group_projections maps to, ``report.options_for_config``)."""
    from qlora_trainer.models.catalog import CATALOG
    from benchmarks.speed.recipes import StepOptions, step_ops

    o = StepOptions(seq_len=96, lora_r=8, act_bytes=4, optimizer="adamw", kernels=kernels, fused_qkv=True,
                    fused_gate_up=True)
    ops = [op for op in step_ops(CATALOG["tiny"], o) if op.phase != "optimizer"]
    gemms = [op for op in ops if op.kind == "gemm"]
    return {"dequant": sum(op.count for op in ops if op.kind == "dequant"), "gemm": sum(op.count for op in gemms),
            "flops": sum(op.total_flops for op in gemms), "launches": sum(op.total_launches for op in ops)}


def test_step_model_predicts_the_grouped_step():
    """Dequantizations (one per group and pass), GEMMs (B, du and dB per member) and their FLOPs of a
    real grouped step (backend independent: the torch path checks them) equal the step model's."""
    got, modelled = count_step(kernels="torch"), _grouped_model(kernels=False)
    assert (modelled["dequant"], modelled["gemm"]) == (got["dequant"], got["gemm"]) == (43, 220)
    assert modelled["flops"] == pytest.approx(got["flops"], rel=1e-9)


@pytest.mark.slow
def test_step_counts_triton_backend():
    got = count_step()
    print(got)
    assert {k: got[k] for k in AFTER} == AFTER
    # every launch of the grouped step (concatenations of A, du, dy and RoPE's/SwiGLU's contiguous
    # copies included) as the step model predicts it
    assert _grouped_model(kernels=True)["launches"] == pytest.approx(got["launches"], rel=0.01)
    # fused residual add + RMSNorm: one kernel per layer in forward and recompute, one in backward,
    # each replacing an aten add (the residual add; the gradient sum) next to an RMSNorm launch,
    # and the input norms' backward (layers 1-3) sums the residual gradient too. Plain RMSNorm
    # left: 4 input norms + 4 recomputed + the final one forward; the final one backward
    assert (got["add_rmsnorm.fwd"], got["add_rmsnorm.bwd"], got["rmsnorm.fwd"], got["rmsnorm.bwd"]) == (8, 7, 9, 1)
    off = count_step(fused_add_norm=False)
    assert off["launches"] == UNFUSED_ADD_NORM == AFTER["launches"] + 3 * 4 + 3 and off.get("add_rmsnorm.fwd", 0) == 0
    assert {k: off[k] for k in ("dequant", "gemm")} == {k: got[k] for k in ("dequant", "gemm")}


def test_partial_checkpointing_recomputes_only_the_first_n_layers():
    """performance.checkpoint_layers=2 of 4: two layers are wrapped and recomputed (minus their
    down_proj base matmul); the step equals the one without checkpointing."""
    from qlora_trainer.kernels.base_weight import COUNTS
    from qlora_trainer.models.checkpointing import CheckpointedLayer

    runs = {}
    for n in (0, 2):
        model, batch = tiny_model(kernels="torch", checkpoint_layers=n, group_projections=False)
        wrapped = [isinstance(layer, CheckpointedLayer) for layer in model.model.layers]
        assert wrapped == [i < n for i in range(4)]
        COUNTS.clear()
        runs[n] = step_grads(model, batch) + (dict(COUNTS),)
    assert runs[0][2]["forward"] == 28 and runs[2][2]["forward"] == 28 + 2 * (7 - 1)
    torch.testing.assert_close(runs[2][0], runs[0][0], rtol=1e-6, atol=0)
    for k, g in runs[0][1].items():
        torch.testing.assert_close(runs[2][1][k], g, rtol=1e-4, atol=1e-6, msg=k)
