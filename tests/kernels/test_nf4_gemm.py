"""The large-M NF4 matmul paths (``performance.nf4_matmul``) against the torch reference.

``fused`` (``_triton_nf4_gemm.nf4_gemm``: the tiled GEMM reading packed NF4) and ``chunked``
(``BaseWeight._chunked``: row chunks of W dequantized and multiplied one at a time), forward
``x @ W^T + b`` and dx ``dy @ W``, vs float64 ``a @ W`` on the reference dequantization of W to the
activation dtype. Shapes: in = 352 / 96 (a row ends inside a quantization block: per-byte scales)
and 384 / 256 (whole blocks per row: one scale per row per k-step), out = odd multiples of the
blocksize (64 and 128), double quant on and off, M = 1, 7, 65, 300, fp32 and bf16; a LUT=1 /
32-wide tile config; the path switch; the LoRA Function with each path. Tolerances as
test_lora_linear.py: fp32 1e-5, bf16 1.5e-2 relative (bf16 operands and output).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from qlora_trainer.kernels.base_weight import BaseWeight, base_weight, set_nf4_matmul
from qlora_trainer.kernels.lora_linear import lora_linear
from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
# (out, in, blocksize, double quant): unaligned (in % blocksize != 0) and aligned rows
CASES = [(192, 352, 64, True), (320, 96, 128, False), (192, 384, 64, False), (384, 256, 128, True)]
TOKENS = {torch.float32: (1, 7, 65, 300), torch.bfloat16: (7, 65)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _weight(out_f: int, in_f: int, blocksize: int, dq: bool, dtype: torch.dtype, device) -> tuple[NF4Weight, torch.Tensor]:
    """An NF4 weight (out_f, in_f) and its reference dequantization in ``dtype``, as float64."""
    import bitsandbytes.functional as bnbF

    gen = torch.Generator().manual_seed(out_f * in_f + blocksize)
    packed, state = bnbF.quantize_4bit(torch.randn(out_f, in_f, generator=gen) * 0.1, blocksize=blocksize,
                                       compress_statistics=dq, quant_type="nf4")
    state.dtype = dtype
    w = NF4Weight.from_bnb(packed, state)
    w_ref = dequantize_nf4_reference(w, dtype).double()
    if device.type != "cpu":  # quantized on the CPU (the same codes everywhere), then moved
        moved = {k: getattr(w, k).to(device) for k in ("packed", "absmax", "code", "code2", "absmax2", "offset")
                 if getattr(w, k) is not None}
        w = dataclasses.replace(w, **moved)
    return w, w_ref.to(device)


def _both_directions(mm, w_ref: torch.Tensor, dtype: torch.dtype, tokens, device) -> None:
    """mm(a, trans_w, bias) for forward and dx at each M, vs float64 on the same W."""
    out_f, in_f = w_ref.shape
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(out_f, generator=gen).to(device, dtype)
    for m in tokens:
        x = torch.randn(m, in_f, generator=gen).to(device, dtype)
        dy = torch.randn(m, out_f, generator=gen).to(device, dtype)
        y, dx = mm(x, True, bias), mm(dy, False, None)
        assert y.shape == (m, out_f) and dx.shape == (m, in_f) and y.dtype == dx.dtype == dtype
        assert rel_err(y, x.double() @ w_ref.t() + bias.double()) < TOL[dtype], ("forward", m)
        assert rel_err(dx, dy.double() @ w_ref) < TOL[dtype], ("dx", m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-bs{c[2]}-dq{int(c[3])}")
def test_fused_gemm_matches_dequant_then_matmul(case, dtype, device):
    from qlora_trainer.kernels._triton_nf4_gemm import nf4_gemm

    w, w_ref = _weight(*case, dtype, device)
    _both_directions(lambda a, t, b: nf4_gemm(a, w, trans_w=t, bias=b), w_ref, dtype, TOKENS[dtype], device)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["unaligned", "aligned"])
def test_fused_gemm_memory_table_and_narrow_tiles(case, device):
    """LUT=1 (the NF4 table read from memory), 32-wide tiles (BLOCK_K < blocksize: the same row
    scale for several k-steps), GROUP_M=1; on CUDA the config is forced too (no autotuning)."""
    from qlora_trainer.kernels._triton_nf4_gemm import nf4_gemm

    w, w_ref = _weight(*case, torch.float32, device)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "LUT": 1}
    _both_directions(lambda a, t, b: nf4_gemm(a, w, trans_w=t, bias=b, config=cfg), w_ref, torch.float32,
                     (65,), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-bs{c[2]}-dq{int(c[3])}")
def test_chunked_matches_dequant_then_matmul(case, dtype, device):
    """Chunks of 40 or so rows (several per weight, the last one shorter), through BaseWeight."""
    w, w_ref = _weight(*case, dtype, device)
    bw = BaseWeight(nf4=w, large_m="chunked", chunk_bytes=40 * case[1] * 2)
    rows = bw.chunk_rows(torch.tensor([], dtype=dtype).element_size())
    assert 0 < rows < case[0] and (rows * case[1]) % case[2] == 0
    tokens = tuple(m for m in TOKENS[dtype] if m > 64)  # chunked runs above DECODE_MAX_TOKENS

    def mm(a, trans_w, bias):
        b = BaseWeight(nf4=w, bias=bias, large_m="chunked", chunk_bytes=bw.chunk_bytes)
        return b.forward_matmul(a) if trans_w else b.backward_matmul(a)

    _both_directions(mm, w_ref, dtype, tokens, device)


def test_path_switch():
    """One decision: decode kernel at <= 64 tokens, the weight's large-M path above; fused falls
    back to dequant for an odd ``in``; dense weights and the torch backend always dequant."""
    w, _ = _weight(192, 352, 64, True, torch.float32, torch.device("cpu"))
    odd, _ = _weight(64, 97, 64, False, torch.float32, torch.device("cpu"))
    for path in ("dequant", "chunked", "fused"):
        bw = BaseWeight(nf4=w, large_m=path)
        assert (bw.path(64), bw.path(65), bw.path(65, decode=True), bw.path(65, decode=False)) == \
            ("decode", path, "decode", "dequant")
        assert BaseWeight(nf4=w, large_m=path, backend="torch").path(300) == "dequant"
    assert BaseWeight(nf4=odd, large_m="fused").path(300) == "dequant"
    assert BaseWeight(nf4=odd, large_m="chunked").path(300) == "chunked"
    assert BaseWeight(dense=torch.zeros(4, 4), large_m="fused").path(300) == "dequant"
    with pytest.raises(ValueError, match="large_m"):
        BaseWeight(nf4=w, large_m="fast")


def test_set_nf4_matmul_rebuilds_the_cached_base_weight():
    import bitsandbytes as bnb

    from qlora_trainer.models.nf4_linear import claim_4bit_layers

    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 128) * 0.1, requires_grad=False, quant_type="nf4")
    lin.weight = lin.weight._quantize("cpu") if hasattr(lin.weight, "_quantize") else lin.weight.to("cpu")
    claim_4bit_layers(lin, backend="torch")
    model = nn.Sequential(lin, nn.Linear(4, 4))
    first = base_weight(lin, "triton")
    assert first.large_m == "dequant" and base_weight(lin, "triton") is first
    assert set_nf4_matmul(model, "fused", chunk_bytes=1 << 16) == 1  # the dense Linear is left alone
    second = base_weight(lin, "triton")
    assert second is not first and (second.large_m, second.chunk_bytes) == ("fused", 1 << 16)
    with pytest.raises(ValueError, match="nf4_matmul"):
        set_nf4_matmul(model, "fast")


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_lora_function_with_each_path_matches_the_default(path, device):
    """LoRALinearFunction over 130 tokens: y and the grads of x, A, B equal the dequant path's."""
    w, _ = _weight(192, 352, 64, True, torch.float32, device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 65, 352, generator=gen).to(device).requires_grad_()
    a = (torch.randn(5, 352, generator=gen) * 0.2).to(device).requires_grad_()
    b = (torch.randn(192, 5, generator=gen) * 0.2).to(device).requires_grad_()
    bias = torch.randn(192, generator=gen).to(device)
    dy = torch.randn(2, 65, 192, generator=gen).to(device)
    runs = {}
    for p in ("dequant", path):
        bw = BaseWeight(nf4=w, bias=bias, large_m=p, chunk_bytes=1 << 14)
        y = lora_linear(x, bw, a, b, 0.7)
        runs[p] = (y, *torch.autograd.grad(y, (x, a, b), dy))
    for got, want in zip(runs[path], runs["dequant"]):
        assert rel_err(got, want) < 1e-5


def test_row_range_dequant_both_backends_and_unaligned_start():
    """``dequantize_nf4(rows=(r0, r1))``: W[r0:r1] exactly (Triton and torch), when r0 * in is a
    whole number of blocks (``row_step_for``); else a clear error."""
    from qlora_trainer.kernels.nf4 import dequantize_nf4, row_step_for

    w, w_ref = _weight(192, 352, 64, True, torch.float32, torch.device("cpu"))
    assert row_step_for(352, 64) == 2 and row_step_for(384, 64) == 1 and row_step_for(96, 128) == 4
    for backend in ("triton", "torch"):
        got = dequantize_nf4(w, backend=backend, rows=(66, 131))
        assert torch.equal(got.double(), w_ref[66:131])
    with pytest.raises(ValueError, match="do not start on a block"):
        dequantize_nf4(w, backend="triton", rows=(1, 3))


def _in_compiler_process(k: str) -> bool:
    """Under the interpreter, rerun test ``k`` in a pytest with ``TRITON_INTERPRET=0`` (kernels jitted
    as interpreter functions cannot compile) and return False; True where this process compiles."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if os.environ.get("TRITON_INTERPRET") != "1":
        return True
    run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-m", "slow",
                          "-k", k, "-p", "no:cacheprovider"], cwd=Path(__file__).parents[2], text=True,
                         capture_output=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return False


def _compile_for_hopper(fn, config: tuple, *, dx: bool, aligned: bool, dtype: str):
    """One fused-GEMM kernel ahead of time for sm_90: ``config`` a ``_FWD``/``_DX`` table row,
    ``dtype`` ``bf16`` (tf32 dots) or ``fp32`` (ieee); the compiled kernel (asm, metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, bk, gm, lut, warps, stages = config
    sig = {"A": f"*{dtype}", "PACKED": "*u8", "ABSMAX": "*u8", "CODE": "*fp32", "CODE2": "*fp32", "ABSMAX2": "*fp32",
           "OFFSET": "*fp32", "BIAS": f"*{dtype}", "C": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_cm": "i32", "M_BUCKET": "i32"}
    consts = {"QBLOCK": 64, "QBLOCK2": 256, "NESTED": True, "ALIGNED": aligned, "HAS_BIAS": not dx,
              "PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST_DOT": False, "EVEN_K": aligned,
              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "LUT": lut} | ({"EVEN_N": aligned} if dx else {})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("A", "PACKED", "C", "N", "K", "stride_am",
                                                                           "stride_cm")}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})


@pytest.mark.slow
def test_large_m_gemms_compile_for_hopper_without_a_gpu():
    """Every autotune config of both kernels, aligned and not, compiles ahead of time for sm_90
    (ptxas ships with triton) to wgmma; catches what the interpreter cannot (a jitted function's
    returns must agree in shape even under a constexpr ``if``, layouts of the register gather).
    Measured (triton 3.9): aligned configs 63-125 KiB of shared memory, 132-180 registers, no spills."""
    pytest.importorskip("triton")
    if not _in_compiler_process("compile_for_hopper"):
        return
    from qlora_trainer.kernels import _triton_nf4_gemm as g

    fits = {}  # an unaligned (per-byte scale) config may exceed shared memory: the autotuner skips it
    for fn, table, dx in ((g._nf4_gemm_fwd, g._FWD, False), (g._nf4_gemm_dx, g._DX, True)):
        for config, aligned in [(c, a) for c in table for a in (True, False)]:
            k = _compile_for_hopper(fn, config, dx=dx, aligned=aligned, dtype="bf16")
            assert "wgmma" in k.asm["ptx"], (fn.__name__, config, aligned)
            assert k.metadata.shared < 200 * 1024 or not aligned, (fn.__name__, config, k.metadata.shared)
            fits[fn.__name__, aligned] = fits.get((fn.__name__, aligned), 0) + (k.metadata.shared <= 227 * 1024)
    assert all(fits.values()) and len(fits) == 4, fits  # H100/H200: 227 KiB of shared memory a block


@pytest.mark.slow
def test_fp32_gemm_config_does_not_spill_on_hopper():
    """fp32 A takes its own tile (``_FWD32`` / ``_DX32``): compiled ahead of time for sm_90, its cubin
    uses no local-memory stack (cuobjdump's STACK; the 16-bit tables' tiles spilled 6-10 KB a thread
    in fp32, and reserved GBs of local memory across the card)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not _in_compiler_process("does_not_spill"):
        return
    from qlora_trainer.kernels import _triton_nf4_gemm as g

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip("triton ships no cuobjdump here")
    for fn, config, dx in ((g._nf4_gemm_fwd, g._FWD32[0], False), (g._nf4_gemm_dx, g._DX32[0], True)):
        k = _compile_for_hopper(fn, config, dx=dx, aligned=True, dtype="fp32")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        stacks = [int(x) for x in re.findall(r"STACK:(\d+)", usage)]
        assert stacks and max(stacks) == 0, (fn.__name__, usage[-500:])
