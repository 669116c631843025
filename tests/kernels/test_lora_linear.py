"""LoRA linear autograd Function (NF4 or dense base) vs a float64 plain-autograd oracle.

Checked: output and grads for x, A, B, with the fused NF4 dequant-in-GEMM kernel and with
dequant + matmul, fp32 and bf16, odd sizes (M = 21 / 37 tokens, in = 98 / 97 / 53, out = 70 / 29,
r = 5), without and with LoRA dropout (p = 0.3: the oracle gets x_l = x ⊙ k / (1 - p) with the mask
k regenerated from the seed the Function draws). Dropout saves no extra bytes, is reproducible from
torch's seed (also across a checkpoint recompute) and keeps 1 - p of the inputs.
Tolerances (‖got − ref‖ / ‖ref‖ vs float64 on the same quantized weight): fp32 1e-5; bf16 1.5e-2
(bf16 operands and outputs, ~4e-3 per rounding; the interpreter truncates casts to bf16).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_trainer.kernels.dispatch import lora_matmul
from qlora_trainer.kernels.lora_linear import (BaseWeight, draw_seed, dropout_mask, lora_linear,
                                               lora_linear_reference)
from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
SCALE = 0.7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _nf4_base(out_f, in_f, dtype, blocksize=64, double_quant=True, bias=True, device="cpu"):
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit((torch.randn(out_f, in_f) * 0.1).to(device), blocksize=blocksize,
                                       compress_statistics=double_quant, quant_type="nf4")
    state.dtype = dtype
    w = NF4Weight.from_bnb(packed, state)
    b = torch.randn(out_f).to(device, dtype) if bias else None
    # oracle weight: the Triton dequant in fp32 (bit-exact with bitsandbytes, see test_nf4.py)
    return BaseWeight(nf4=w, bias=b), dequantize_nf4(w, torch.float32, backend="triton")


def _check(base, w_dense, in_f, out_f, dtype, p, decode, lead=(3, 7)):
    r, device = 5, w_dense.device
    x = torch.randn(*lead, in_f).to(device, dtype).requires_grad_()
    a = (torch.randn(r, in_f) * 0.2).to(device).requires_grad_()
    b = (torch.randn(out_f, r) * 0.2).to(device).requires_grad_()
    torch.manual_seed(11)
    seed = draw_seed(device)  # the (1,) seed tensor the Function draws below
    torch.manual_seed(11)
    y = lora_linear(x, base, a, b, SCALE, p, decode=decode)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
    dy = torch.randn_like(y)
    inputs = [x, a, b]
    grads = torch.autograd.grad(y, inputs, dy)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    x64, a64, b64 = ref_inputs
    xl64 = None
    if p > 0:
        m = x.numel() // in_f
        keep = dropout_mask(seed, (m, in_f), p, dtype).double().view(*lead, in_f)
        assert 0 < keep.mean() < 1
        xl64 = x64 * keep / (1 - p)
    bias64 = None if base.bias is None else base.bias.double()
    y64 = lora_linear_reference(x64, w_dense.double(), bias64, a64, b64, SCALE, xl64)
    ref_grads = torch.autograd.grad(y64, ref_inputs, dy.double())
    assert rel_err(y, y64) < TOL[dtype]
    for t, g, g64 in zip(inputs, grads, ref_grads):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.isfinite(g).all()
        assert rel_err(g, g64) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nf4_lora_linear_forward_and_grads(dtype, decode, p, device):
    base, w_dense = _nf4_base(70, 98, dtype, device=device)
    _check(base, w_dense, 98, 70, dtype, p, decode)


@pytest.mark.parametrize("decode", [True, False])
def test_nf4_odd_in_features_blocksize_256_no_double_quant(decode, device):
    base, w_dense = _nf4_base(33, 97, torch.float32, blocksize=256, double_quant=False, bias=False, device=device)
    _check(base, w_dense, 97, 33, torch.float32, p=0.3, decode=decode)


def test_nf4_fused_kernel_large_tile_config(device):
    base, w_dense = _nf4_base(150, 98, torch.float32, device=device)  # M = 130 tokens: 128x128 tiles, 2 x 2 grid
    _check(base, w_dense, 98, 150, torch.float32, p=0.0, decode=True, lead=(130,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "nf4_fused", "nf4_dequant"])
def test_dropout_odd_shapes(dtype, kind, device):
    """p = 0.3, M = 37, in = 53, out = 29, r = 5: forward and grads of x, A, B vs the oracle."""
    if kind == "dense":
        lin = nn.Linear(53, 29).to(device, dtype).requires_grad_(False)
        base, w_dense, decode = BaseWeight.from_module(lin), lin.weight.float(), None
    else:
        (base, w_dense), decode = _nf4_base(29, 53, dtype, device=device), kind == "nf4_fused"
    _check(base, w_dense, 53, 29, dtype, p=0.3, decode=decode, lead=(37,))


@pytest.mark.parametrize("trans_w", [True, False])
def test_fused_kernel_split_k_matches_dequant_matmul(trans_w, device):
    from qlora_trainer.kernels._triton_lora import nf4_matmul

    base, w_dense = _nf4_base(70, 300, torch.float32, device=device)  # forward K = 300: 5 K-blocks over 3 splits
    k = 300 if trans_w else 70
    a = torch.randn(9, k).to(device)
    want = a @ (w_dense.t() if trans_w else w_dense)
    bias = base.bias if trans_w else None
    if bias is not None:
        want = want + bias
    for split in (1, 3):
        got = nf4_matmul(a, base.nf4, trans_w=trans_w, bias=bias, split_k=split)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_base(dtype, device):
    lin = nn.Linear(45, 23).to(device, dtype).requires_grad_(False)
    base = BaseWeight.from_module(lin)
    assert base is not None and base.dense is lin.weight
    _check(base, lin.weight.float(), 45, 23, dtype, p=0.0, decode=None)


def _saved(fn) -> list[torch.Tensor]:
    """The tensors autograd packs for backward while running ``fn()``."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_saves_neither_the_weight_nor_a_dropout_tensor(dtype):
    """Saved: x (shared with the other adapters on the same input), u, A, B — with dropout only the
    (1,) int64 seed more: no W, no dropped copy of x, no mask (8 bytes more than p = 0)."""
    base, _ = _nf4_base(70, 98, dtype)
    x = torch.randn(21, 98).to(dtype).requires_grad_()
    a = torch.randn(5, 98, requires_grad=True)
    b = torch.randn(70, 5, requires_grad=True)
    nbytes = {}
    for p in (0.0, 0.3):
        saved = _saved(lambda: lora_linear(x, base, a, b, SCALE, p))
        want = [(21, 98), (21, 5), (5, 98), (70, 5)] + ([(1,)] if p else [])
        assert sorted(tuple(t.shape) for t in saved) == sorted(want)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, not a copy
        nbytes[p] = sum(t.numel() * t.element_size() for t in saved)
    assert nbytes[0.3] == nbytes[0.0] + 8


def test_dropout_is_reproducible_from_torch_seed_and_keeps_1_minus_p():
    base, _ = _nf4_base(70, 98, torch.float32)
    x = torch.randn(4, 9, 98, requires_grad=True)
    a = torch.randn(5, 98, requires_grad=True)
    b = torch.randn(70, 5, requires_grad=True)

    def run(seed):
        torch.manual_seed(seed)
        y = lora_linear(x, base, a, b, SCALE, 0.3, decode=False)
        torch.rand(100)  # the backward must not depend on the global RNG after the forward
        return (y, *torch.autograd.grad(y.square().sum(), (x, a, b)))

    first, again, other = run(3), run(3), run(4)
    for t1, t2 in zip(first, again):
        assert torch.equal(t1, t2)
    assert not torch.equal(first[0], other[0])
    no_drop = lora_linear(x, base, a, b, SCALE, 0.0, decode=False)
    assert not torch.equal(first[0], no_drop)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpoint_recompute_reproduces_the_dropout_mask(backend, device):
    """Under non-reentrant checkpointing the forward runs again in backward and draws its seed tensor
    again: torch restores the device's RNG state, so u (recomputed) and the mask (regenerated from the
    saved seed) agree and the grads equal the uncheckpointed ones, on both dropout backends."""
    from torch.utils.checkpoint import checkpoint

    import dataclasses

    base = dataclasses.replace(_nf4_base(70, 98, torch.float32, device=device)[0], backend=backend)
    x = torch.randn(2, 11, 98, device=device, requires_grad=True)
    a = torch.randn(5, 98, device=device, requires_grad=True)
    b = torch.randn(70, 5, device=device, requires_grad=True)

    def block(inp):
        return torch.tanh(lora_linear(inp, base, a, b, SCALE, 0.3, decode=False))

    results = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        y = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        torch.rand(100, device=device)  # move the RNG between forward and the recompute
        results.append((y, *torch.autograd.grad(y.sum(), (x, a, b))))
    for plain, ckpt in zip(*results):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


def _linear4bit(in_f, out_f, dtype):
    from qlora_trainer.models.quantize import quantize_linear

    return quantize_linear(nn.Linear(in_f, out_f), compute_dtype=dtype).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_matmul_triton_matches_torch_backend_on_linear4bit(dtype):
    """Both backends run our Function (our NF4 dequantization, never bitsandbytes' CPU kernels) and
    agree with the plain-autograd oracle on the dequantized weight; in=98 is not a multiple of 64."""
    from qlora_trainer.kernels.lora_linear import lora_linear_reference
    from qlora_trainer.lora.layer import dequantized_weight

    base = _linear4bit(98, 70, dtype)
    x = torch.randn(2, 9, 98).to(dtype).requires_grad_()
    a = (torch.randn(6, 98) * 0.2).requires_grad_()
    b = (torch.randn(70, 6) * 0.2).requires_grad_()
    outs = {}
    for backend in ("triton", "torch"):
        y = lora_matmul(x, base, a, b, SCALE, backend=backend)
        outs[backend] = (y, *torch.autograd.grad(y, (x, a, b), torch.ones_like(y)))
        assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
    y = lora_linear_reference(x, dequantized_weight(base, "torch"), base.bias, a, b, SCALE)
    ref = (y, *torch.autograd.grad(y, (x, a, b), torch.ones_like(y)))
    for got, want in zip(outs["torch"], ref):
        assert rel_err(got, want) < TOL[dtype]
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < TOL[dtype]


def test_lora_matmul_falls_back_for_a_trainable_base():
    lin = nn.Linear(20, 12)  # weight requires grad: the Function would drop dW
    x = torch.randn(4, 20)
    a = torch.randn(3, 20, requires_grad=True)
    b = torch.randn(12, 3, requires_grad=True)
    y = lora_matmul(x, lin, a, b, SCALE, backend="triton")
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    torch.testing.assert_close(y, lin(x) + x @ a.t() @ b.t() * SCALE)


def _graph_op_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_tiny_nf4_model_step_triton_matches_torch(tiny_nf4_model):
    """Whole-model parity: the LoRA linears through the Function (fused NF4 kernel, M = 18 tokens)
    and the loss through the Triton chunked cross-entropy, vs the torch backends. fp32: 1e-4."""
    from qlora_trainer.config import LoRAConfig
    from qlora_trainer.lora.inject import inject_lora
    from qlora_trainer.models.loss import causal_lm_loss

    model = tiny_nf4_model.train()  # train mode: bitsandbytes' CPU inference repacking stays off
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])  # GQA v: out 64
    names = inject_lora(model, cfg, dtype=torch.float32, backend="triton")
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in lora_params.values():
            p.normal_(0.0, 0.05)  # lora_B starts at 0: make every gradient non-trivial
    ids = torch.randint(0, 258, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    results = {}
    for backend in ("triton", "torch"):
        for name in names:
            model.get_submodule(name).backend = backend
        loss, n = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, backend=backend)
        if backend == "triton":
            ops = _graph_op_names(loss)
            assert {"LoRALinearFunctionBackward", "LinearCrossEntropyFunctionBackward"} <= ops
        grads = torch.autograd.grad(loss / n, list(lora_params.values()))
        results[backend] = (loss, grads)
    (loss_t, grads_t), (loss_r, grads_r) = results["triton"], results["torch"]
    assert rel_err(loss_t, loss_r) < 1e-5
    for g_t, g_r in zip(grads_t, grads_r):
        assert g_r.abs().max() > 0
        assert rel_err(g_t, g_r) < 1e-4
