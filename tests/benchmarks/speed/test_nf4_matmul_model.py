"""The step model's base matmul per ``performance.nf4_matmul`` path, against hand-computed bytes and
launches for one (M, in) @ W^T (out, in) NF4 GEMM and its dx, and the config -> options mapping."""

from __future__ import annotations

import pytest

from benchmarks.speed.ops import nf4_bytes
from benchmarks.speed.recipes import DECODE_MAX_TOKENS, StepOptions, _base_matmul


def _ops(path: str, dx: bool = False, m: int = 128):
    o = StepOptions(fused_dequant_gemm=path == "fused", nf4_chunk_bytes=4096 if path == "chunked" else 0)
    fused = o.fused_dequant_gemm or m <= DECODE_MAX_TOKENS  # as recipes._ours_linear decides
    out_f, in_f = 96, 64  # W (96, 64) bf16 = 12 KiB: 3 chunks of 4 KiB (32 rows)
    k, n, name = (out_f, in_f, "x.dx") if dx else (in_f, out_f, "x")
    return _base_matmul(o, "forward", name, m, k, n, fused, (out_f, in_f))


@pytest.mark.parametrize("dx", [False, True])
def test_bytes_and_launches_per_path(dx):
    m, numel, w_nf4 = 128, 96 * 64, nf4_bytes(96 * 64)
    act = m * 64 * 2 + m * 96 * 2  # x (or dx) and y (or dy), bf16, once each
    dq = _ops("dequant", dx)
    assert [op.kind for op in dq] == ["dequant", "gemm"] and sum(op.launches for op in dq) == 2
    assert sum(op.bytes for op in dq) == w_nf4 + 2 * numel + 2 * numel + act  # NF4 in, bf16 W out and back in
    fused, = _ops("fused", dx)
    assert fused.name.endswith(".fused") and fused.launches == 1 and fused.bytes == w_nf4 + act
    ch = _ops("chunked", dx)
    assert [op.kind for op in ch] == ["dequant", "gemm"] * 3 and sum(op.launches for op in ch) == 6
    assert sum(op.bytes for op in ch if op.kind == "dequant") == pytest.approx(3 * nf4_bytes(32 * 64))
    gemm_bytes = sum(op.bytes for op in ch if op.kind == "gemm")  # W from L2; x or dx once per chunk
    assert gemm_bytes == (3 * m * 64 * 2 + m * 96 * 2 + 2 * m * 64 * 2 if dx else 3 * m * 64 * 2 + m * 96 * 2)
    assert sum(op.flops for op in ch) == sum(op.flops for op in dq) == 2 * m * numel


def test_small_m_is_always_the_decode_kernel_and_config_maps_the_path():
    small = _ops("chunked", m=64)  # <= DECODE_MAX_TOKENS: the decode kernel, whatever the path
    assert small == _ops("dequant", m=64) == _ops("fused", m=64) and small[0].name.endswith(".fused")
    from qlora_trainer.config import Config
    from benchmarks.speed.report import options_for_config

    cfg = Config()
    cfg.lora.dropout = 0.0
    base = options_for_config(cfg)
    assert (base.fused_dequant_gemm, base.nf4_chunk_bytes, base.fused_qkv) == (False, 0, True)
    cfg.performance.nf4_matmul = "fused"
    fused = options_for_config(cfg)
    assert fused.fused_dequant_gemm and not fused.fused_qkv  # a fused member is not grouped
    cfg.performance.nf4_matmul = "chunked"
    assert options_for_config(cfg).nf4_chunk_bytes == 8 << 20
    cfg.performance.kernels = "torch"  # the torch references: every path is dequant + matmul
    assert options_for_config(cfg).nf4_chunk_bytes == 0 and options_for_config(cfg).fused_qkv
