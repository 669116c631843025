"""FLOP and byte counts of each op primitive against hand-computed values for a small shape."""

from __future__ import annotations

import pytest

from qlora_trainer.models.catalog import ArchSpec
from benchmarks.speed.ops import Op, attention, dequant, elementwise, gemm, merge_ops, nf4_bytes
from benchmarks.speed.recipes import StepOptions, checkpointed_layers, step_ops


def test_gemm_counts():
    op = gemm("g", "forward", 8, 16, 4, 2)          # (8,16) @ (16,4)
    assert op.flops == 2 * 8 * 16 * 4 == 1024
    assert op.bytes == (8 * 16 + 16 * 4 + 8 * 4) * 2 == 448
    acc = gemm("g", "forward", 8, 16, 4, 2, accumulate=True)
    assert acc.bytes == 448 + 8 * 4 * 2                # the output is read too
    fused = gemm("g", "forward", 8, 16, 4, 2, w_bytes=40.0)
    assert fused.bytes == (8 * 16 + 8 * 4) * 2 + 40


def test_nf4_dequant_bytes():
    # 4096 elements, blocksize 64: 2048 packed bytes, 64 uint8 scales + 1 fp32 second-level scale
    assert nf4_bytes(4096, 64, True) == 2048 + 64 + 4
    assert nf4_bytes(4096, 64, False) == 2048 + 4 * 64
    assert dequant("d", "forward", 4096, 2).bytes == 2048 + 68 + 4096 * 2


def test_elementwise_and_attention():
    assert elementwise("e", "forward", 10, 5, 4).bytes == 60
    # B=1, T=8, Hq=2, Hk=1, D=4, bf16: causal forward 4*1*2*64*4/2 = 1024 FLOPs
    f = attention("forward", 1, 8, 2, 1, 4, 2)
    assert f.flops == 1024
    assert f.bytes == (2 * 64 + 2 * 32) * 2 + 2 * 8 * 4      # q, o; k, v; fp32 lse
    b = attention("backward", 1, 8, 2, 1, 4, 2, backward=True)
    assert b.flops == 2560
    assert b.bytes == (3 * 64 + 2 * 32) * 2 + 64 + (64 + 2 * 32) * 2 + 2 * 64 * 4


def test_op_validation_and_merge():
    with pytest.raises(ValueError, match="unknown kind"):
        Op("x", "nope", "forward")
    a = elementwise("e", "forward", 1, 1, 2)
    merged = merge_ops([a, a, a.times(3)])
    assert len(merged) == 1 and merged[0].count == 5


SMALL = ArchSpec("small", hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=32)


def test_step_gemm_flops_by_hand():
    """No LoRA dropout, r=2, 4 tokens, checkpointing: base GEMM FLOPs = 2 * M * params per pass;
    forward + recompute over both layers, backward dx over all but layer 0's q/k/v."""
    o = StepOptions(seq_len=4, lora_r=2, act_bytes=4, optimizer="adamw", skip_down_recompute=False)
    ops = step_ops(SMALL, o)
    base = sum(op.total_flops for op in ops if op.name.startswith("base."))
    q, kv, mlp = 8 * 8, 8 * 4, 8 * 16
    per_layer = q + 2 * kv + q + 3 * mlp                # q, k, v, o, gate, up, down params
    expect = 2 * 4 * (2 * per_layer * 2 + per_layer * 2 - (q + 2 * kv))
    assert base == expect
    lm = sum(op.total_flops for op in ops if op.name.startswith("lm_head"))
    assert lm == 2 * (2 * 3 * 8 * 32)                   # logits + dh over T-1 = 3 rows
    assert checkpointed_layers(80, 1) == 80 and checkpointed_layers(80, 4) == 20 and checkpointed_layers(80, 0) == 0


def test_options_change_what_they_should():
    o = StepOptions(seq_len=512, act_bytes=2, skip_down_recompute=False)
    arch = ArchSpec("m", hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=1000)
    base = step_ops(arch, o)
    dq = sum(op.count for op in base if op.kind == "dequant")

    def count(opts, kind="dequant"):
        return sum(op.count for op in step_ops(arch, opts) if op.kind == kind)

    from dataclasses import replace
    assert count(replace(o, ckpt_every=0)) == dq - 4 * 7             # no recompute
    assert count(replace(o, skip_down_recompute=True)) == dq - 4      # no down_proj in the recompute
    # 4 linears a layer instead of 7, three passes each; layer 0 skips one qkv dx instead of three
    assert count(replace(o, fused_qkv=True, fused_gate_up=True)) == 4 * 4 * 3 - 1 == dq - 4 * 3 * 3 + 2
    assert count(replace(o, fused_dequant_gemm=True)) == 0
    hf = count(replace(o, system="hf", kernels=False), "dequant_bnb")
    assert hf == 4 * 7 * 3                                            # every weight three times


def test_offload_and_partial_checkpointing():
    from dataclasses import replace

    arch = ArchSpec("m", hidden=256, intermediate=512, layers=8, heads=4, kv_heads=2, vocab=1000)
    o = StepOptions(seq_len=512, skip_down_recompute=False)
    h2d = [op for op in step_ops(arch, replace(o, offload=True)) if op.kind == "transfer"]
    assert len(h2d) == 1 and h2d[0].count == 8 and h2d[0].bytes == 512 * 256 * 2   # one checkpoint per layer
    rec = {k: sum(op.count for op in step_ops(arch, replace(o, ckpt_every=k))
                  if op.phase == "recompute" and op.name == "dequant") for k in (1, 2, 0)}
    assert rec == {1: 8 * 7, 2: 4 * 7, 0: 0}
    hf = {op.name for op in step_ops(arch, replace(o, system="hf", kernels=False))}
    assert {"hf.cast_in", "hf.clone", "lora.A.fp32", "lm_head.fp32"} <= hf
