"""Grouped LoRA projections (kernels/grouped_linear.py) against per-member float64 oracles: the
forward and the gradients of x and every A_i / B_i, NF4 (double quant) and dense members, odd
sizes (in = 97, o_i = 29 / 48 / 16, r_i = 3 / 5 / 4), fp32 and bf16, both backends
(Triton: the dequant kernel under the interpreter writing into the group's rows).
Tolerances as tests/kernels/test_lora_linear.py (relative to the float64 result)."""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.base_weight import COUNTS, BaseWeight
from qlora_trainer.kernels.grouped_linear import GroupWeight, group_weight, grouped_lora_linear
from qlora_trainer.kernels.lora_linear import lora_linear_reference
from qlora_trainer.kernels.nf4 import NF4Weight

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _members(outs, in_f, dtype, backend, nf4):
    import bitsandbytes.functional as bnbF

    members = []
    for i, o in enumerate(outs):
        bias = torch.randn(o).to(dtype) if i != 1 else None  # a member without bias
        if nf4:
            packed, state = bnbF.quantize_4bit(torch.randn(o, in_f) * 0.1, blocksize=64,
                                               compress_statistics=True, quant_type="nf4")
            state.dtype = dtype
            members.append(BaseWeight(nf4=NF4Weight.from_bnb(packed, state), bias=bias, backend=backend))
        else:
            members.append(BaseWeight(dense=(torch.randn(o, in_f) * 0.1).to(dtype), bias=bias, backend=backend))
    return members


@pytest.mark.parametrize("backend,nf4,dtype", [("torch", True, torch.float32), ("torch", False, torch.float32),
                                               ("triton", True, torch.float32), ("triton", True, torch.bfloat16)])
def test_grouped_matches_per_member_oracle(backend, nf4, dtype):
    in_f, outs, ranks, scales = 97, (29, 48, 16), (3, 5, 4), (0.7, 2.0, 0.25)  # member blocks unaligned
    members = _members(outs, in_f, dtype, backend, nf4)
    x = torch.randn(3, 7, in_f).to(dtype).requires_grad_()
    As = [(torch.randn(r, in_f) * 0.2).requires_grad_() for r in ranks]
    Bs = [(torch.randn(o, r) * 0.2).requires_grad_() for o, r in zip(outs, ranks)]
    ys = grouped_lora_linear(x, GroupWeight.build(tuple(members)), As, Bs, list(scales))
    assert [tuple(y.shape) for y in ys] == [(3, 7, o) for o in outs] and all(y.dtype == dtype for y in ys)
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, [x, *As, *Bs], dys)

    ref_in = [t.detach().double().requires_grad_() for t in (x, *As, *Bs)]
    x64, As64, Bs64 = ref_in[0], ref_in[1:4], ref_in[4:]
    ref = [lora_linear_reference(x64, bw.weight(torch.float32).double(),
                                 None if bw.bias is None else bw.bias.double(), a, b, s)
           for bw, a, b, s in zip(members, As64, Bs64, scales)]
    ref_grads = torch.autograd.grad(ref, ref_in, [d.double() for d in dys])
    for y, r in zip(ys, ref):
        assert rel_err(y, r) < TOL[dtype]
    for name, g, r in zip(["x", "A1", "A2", "A3", "B1", "B2", "B3"], grads, ref_grads):
        assert g.dtype == (dtype if name == "x" else torch.float32), name
        assert rel_err(g, r) < TOL[dtype], name


def test_group_weight_is_cached_and_counts_one_gemm():
    owner = torch.nn.Module()
    members = tuple(_members((8, 12), 16, torch.float32, "torch", nf4=True))
    gw = group_weight(owner, "qkv", members)
    assert group_weight(owner, "qkv", members) is gw
    assert group_weight(owner, "qkv", (members[1], members[0])) is not gw
    COUNTS.clear()
    x = torch.randn(5, 16, requires_grad=True)
    A = [torch.zeros(2, 16, requires_grad=True), torch.zeros(3, 16, requires_grad=True)]
    B = [torch.zeros(8, 2, requires_grad=True), torch.zeros(12, 3, requires_grad=True)]
    y1, y2 = grouped_lora_linear(x, gw, A, B, [1.0, 1.0])
    (y1.sum() + y2.sum()).backward()
    assert COUNTS == {"forward": 1, "dx": 1, "dequant": 2}  # forward and dx: one group decode, one GEMM each


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_matches_per_member_calls_on_cuda(dtype):
    """CUDA copy: the grouped Function vs each member's own LoRALinearFunction (Triton dequant)."""
    from qlora_trainer.kernels.lora_linear import lora_linear

    dev = torch.device("cuda")
    outs, ranks, scales = (96, 32, 32), (8, 8, 8), (2.0, 2.0, 2.0)
    members = []
    for bw in _members(outs, 128, dtype, "triton", nf4=True):
        nf4 = bw.nf4
        moved = NF4Weight(**{f: (getattr(nf4, f).to(dev) if isinstance(getattr(nf4, f), torch.Tensor) else
                                 getattr(nf4, f)) for f in nf4.__dataclass_fields__})
        members.append(BaseWeight(nf4=moved, bias=None if bw.bias is None else bw.bias.to(dev), backend="triton"))
    x = torch.randn(4, 100, 128, device=dev, dtype=dtype, requires_grad=True)
    As = [(torch.randn(r, 128, device=dev) * 0.2).requires_grad_() for r in ranks]
    Bs = [(torch.randn(o, r, device=dev) * 0.2).requires_grad_() for o, r in zip(outs, ranks)]
    ys = grouped_lora_linear(x, GroupWeight.build(tuple(members)), As, Bs, list(scales))
    ref = [lora_linear(x, bw, a, b, s) for bw, a, b, s in zip(members, As, Bs, scales)]
    dys = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, [x, *As, *Bs], dys)
    want = torch.autograd.grad(ref, [x, *As, *Bs], dys)
    for y, r in zip(ys, ref):
        assert rel_err(y, r) < TOL[dtype]
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]
