"""Triton NF4 dequantization vs our torch reference and an independent torch oracle of the layout.

bitsandbytes only quantizes here: its CPU dequantize depends on the CPU's features
(docs/bitsandbytes-cpu.md), so it is never the oracle.

Tolerances: fp32 output bit-exact (the same fp32 ops as bitsandbytes' format defines: code * absmax,
and for double quant code2[a] * absmax2 + offset, FMA contraction off). bf16 output within 1 bf16 ulp
(relative 2^-7): the Triton CPU interpreter truncates fp32 -> bf16 where bitsandbytes and the GPU
round to nearest.
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference


def _quantized(shape, blocksize, double_quant, dtype=torch.float32, device="cpu"):
    import bitsandbytes.functional as bnbF

    w = (torch.randn(shape) * 0.05).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type="nf4")
    state.dtype = dtype
    return NF4Weight.from_bnb(packed, state)


def _torch_oracle(w: NF4Weight) -> torch.Tensor:
    """The documented layout, written out independently of both implementations (fp32)."""
    n = w.numel
    q = w.packed.long()
    nib = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n]
    if w.code2 is not None:
        absmax = w.code2[w.absmax.long()] * w.absmax2.repeat_interleave(w.blocksize2)[: w.absmax.numel()]
        absmax = absmax + w.offset
    else:
        absmax = w.absmax
    return (w.code[nib] * absmax.repeat_interleave(w.blocksize)[:n]).reshape(w.shape)


def _assert_within_one_bf16_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.float(), want.float()
    assert ((got - want).abs() <= want.abs() * 2.0**-7 + 1e-30).all()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_dequant_matches_reference(blocksize, double_quant, device):
    # 37 * 130 = 4810 elements: not a multiple of either block size nor of the kernel's 2048 tile
    w = _quantized((37, 130), blocksize, double_quant, device=device)
    out = dequantize_nf4(w, torch.float32, backend="triton")
    ref = dequantize_nf4_reference(w, torch.float32)
    assert out.shape == (37, 130) and out.dtype == torch.float32
    assert torch.equal(out, ref)  # bit-exact, and every element written (no NaN/garbage)
    out_bf16 = dequantize_nf4(w, torch.bfloat16, backend="triton")
    assert out_bf16.dtype == torch.bfloat16
    _assert_within_one_bf16_ulp(out_bf16, dequantize_nf4_reference(w, torch.bfloat16))


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequant_odd_shape_matches_layout_oracle(double_quant, device):
    w = _quantized((13, 67), 64, double_quant, device=device)  # odd element count: last byte half-used
    oracle = _torch_oracle(w)
    assert torch.equal(dequantize_nf4(w, torch.float32, backend="triton"), oracle)
    # the oracle itself agrees with the reference on an even shape (guards the oracle)
    w2 = _quantized((9, 130), 64, double_quant, device=device)
    assert torch.equal(_torch_oracle(w2), dequantize_nf4_reference(w2, torch.float32))


def test_default_dtype_and_torch_backend_and_auto_on_cpu():
    w = _quantized((21, 64), 64, True, dtype=torch.bfloat16)
    ref = dequantize_nf4_reference(w)
    assert ref.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(w, backend="torch"), ref)
    assert torch.equal(dequantize_nf4(w), ref)  # auto on CPU -> the torch reference
    _assert_within_one_bf16_ulp(dequantize_nf4(w, backend="triton"), ref)


def test_from_linear4bit_module():
    from qlora_trainer.models.quantize import quantize_linear

    lin = torch.nn.Linear(96, 40, bias=False)
    q = quantize_linear(lin, compute_dtype=torch.float32)
    w = NF4Weight.from_bnb(q.weight.data, q.weight.quant_state)
    assert w.shape == (40, 96) and w.code2 is not None
    out = dequantize_nf4(w, torch.float32, backend="triton")
    assert torch.equal(out, dequantize_nf4_reference(w, torch.float32))
    assert (out - lin.weight.detach()).abs().max() < 0.2 * lin.weight.abs().max()  # it is W, 4-bit


def test_fp4_is_rejected():
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb(packed, state)


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time compile of part A's Triton kernels for sm_90 (ptxas ships with triton): catches
    what the CPU interpreter cannot (typing of loop-carried values, layouts), and checks the
    lowering we rely on: 16-byte vector stores in the dequant, wgmma in the 128x128 fused GEMM."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels were jitted as interpreter functions
        repo = Path(__file__).resolve().parents[2]
        run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-m", "slow",
                              "-k", "compile_for_hopper", "-p", "no:cacheprovider"], cwd=repo, text=True,
                             capture_output=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qlora_trainer.kernels import _triton_ce, _triton_lora, _triton_nf4

    def compile_ptx(fn, sig, consts, aligned, **opts):
        sig = {**sig, **{k: "constexpr" for k in consts}}
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

    w_sig = {"PACKED": "*u8", "ABSMAX": "*u8", "CODE": "*fp32", "CODE2": "*fp32", "ABSMAX2": "*fp32",
             "OFFSET": "*fp32"}
    ptx = compile_ptx(_triton_nf4._nf4_dequant_kernel,
                      {**w_sig, "OUT": "*bf16", "numel": "i64", "n_bytes": "i64", "n_blocks": "i64", "blk0": "i32"},
                      {"QBLOCK": 64, "QBLOCK2": 256, "NESTED": True, "BLOCK_BYTES": 1024},
                      ["PACKED", "OUT", "numel", "n_bytes"], num_warps=4, enable_fp_fusion=False)
    assert re.search(r"st\.global\.v4\.b32", ptx) and re.search(r"ld\.global\.v\d\.b32", ptx)
    member = {"P": "*u8", "A": "*u8", "C": "*fp32", "D": "*fp32", "S": "*fp32", "F": "*fp32", "N": "i64"}
    group_sig = {"OUT": "*bf16", **{f"{k}{i}": v for i in range(3) for k, v in member.items()},
                 **{f"{k}{i}": "i64" for i in (1, 2) for k in "ET"}}
    ptx = compile_ptx(_triton_nf4._nf4_dequant_group_kernel, group_sig,  # q/k/v in one launch
                      {"MEMBERS": 3, "QBLOCK": 64, "QBLOCK2": 256, "NESTED": True, "BLOCK_BYTES": 1024},
                      ["OUT", "P0", "P1", "P2", "N0", "N1", "N2", "E1", "E2"], num_warps=4, enable_fp_fusion=False)
    assert len(re.findall(r"st\.global\.v4\.b32", ptx)) >= 3  # each member's branch keeps vector stores
    for trans_w in (True, False):
        ptx = compile_ptx(_triton_lora._nf4_matmul_kernel,
                          {"A": "*bf16", **w_sig, "BIAS": "*bf16", "C": "*bf16", "M": "i32", "N": "i32",
                           "K": "i32", "stride_am": "i32", "stride_cm": "i32", "k_per_split": "i32"},
                          {"QBLOCK": 64, "QBLOCK2": 256, "NESTED": True, "TRANS_W": trans_w, "HAS_BIAS": True,
                           "PRECISION": "tf32", "UPCAST_DOT": False, "PAIRED": True, "BLOCK_M": 128,
                           "BLOCK_N": 128, "BLOCK_K": 64},
                          ["A", "PACKED", "C", "N", "K", "stride_am", "stride_cm"], num_warps=8, num_stages=2,
                          enable_fp_fusion=False)
        assert "wgmma" in ptx
    ptx = compile_ptx(_triton_ce._ce_chunk_kernel,
                      {"LOGITS": "*bf16", "LABELS": "*i64", "LOSS": "*fp32", "stride_row": "i32", "V": "i32",
                       "ignore_index": "i32"}, {"WRITE_GRAD": True, "BLOCK_V": 4096}, ["LOGITS", "stride_row"],
                      num_warps=8)
    assert "ex2.approx" in ptx  # exp lowered to the fast hardware path


def _elementwise_reference(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The formula one element at a time in vectors (the earlier reference: an int64 code index per
    element, the scales gathered per element), fp32 then one rounding to ``dtype``."""
    n = w.numel
    q = w.packed[: (n + 1) // 2]
    codes = torch.stack((q >> 4, q & 15), dim=1).reshape(-1)[:n].long()
    scale = w.absmax.float()
    if w.code2 is not None:
        blk2 = torch.arange(w.absmax.numel()) // w.blocksize2
        scale = w.code2[w.absmax.long()] * w.absmax2[blk2] + w.offset
    return (w.code[codes] * scale[torch.arange(n) // w.blocksize]).reshape(w.shape).to(dtype)


@pytest.mark.parametrize("chunk_bytes", [96, 1 << 17])  # many passes (and a partial last one), one pass
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_bit_equal_to_the_elementwise_formula(blocksize, double_quant, chunk_bytes, monkeypatch):
    """The byte-pair gather with per-block scales gives the same bits as the formula element by
    element, for odd sizes (a half-used last byte, a partial last block), every output dtype,
    a fresh result and one written into ``out``."""
    import qlora_trainer.kernels.nf4 as nf4

    monkeypatch.setattr(nf4, "REF_CHUNK_BYTES", chunk_bytes)
    for shape in [(13, 67), (37, 130), (1, 1), (3, 5), (300, 257), (40, 96)]:
        w = _quantized(shape, blocksize, double_quant)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            want = _elementwise_reference(w, dtype)
            assert torch.equal(dequantize_nf4_reference(w, dtype), want), (shape, dtype)
            out = torch.full(shape, float("nan"), dtype=dtype)
            assert dequantize_nf4(w, backend="torch", out=out) is out and torch.equal(out, want), (shape, dtype)
