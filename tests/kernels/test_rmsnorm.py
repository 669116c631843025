"""Triton RMSNorm (interpreter on CPU) vs the torch reference and a float64 oracle: forward, dx, dw;
and the fused residual add + RMSNorm (y, s; dx, dresidual, dw; what it saves).

Tolerances (‖out − ref‖ / ‖ref‖ against float64 on the same inputs): fp32 1e-5, bf16 1e-2
(bf16 keeps 8 bits of mantissa: one rounding is up to 4e-3 relative; the Triton interpreter
truncates fp32 -> bf16 casts where the GPU rounds to nearest, so bf16 results may differ by an ulp).
"""

from __future__ import annotations

import pytest
import torch

from qlora_trainer.kernels.rmsnorm import RMSNorm, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype, weight_dtype=None, device="cpu"):
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.rand(shape[-1]) + 0.5).to(device, weight_dtype or dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 97), (1, 300), (5, 1, 2, 64)])
def test_rmsnorm_forward_and_grads_match_reference(shape, dtype, device):
    x, w = _inputs(shape, dtype, device=device)
    y = rms_norm(x, w, 1e-5, backend="triton")
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-5)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert y.dtype == dx.dtype == dtype and dw.dtype == dtype
    for got, want in [(y, y64), (dx, dx64), (dw, dw64)]:
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[dtype]
    if dtype == torch.float32:  # and directly against the torch path it replaces
        yr = rms_norm(x, w, 1e-5, backend="torch")
        dxr, dwr = torch.autograd.grad(yr, (x, w), dy)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, dwr, rtol=1e-5, atol=1e-4)


def test_rmsnorm_bf16_input_fp32_weight_promotes_like_transformers(device):
    x, w = _inputs((4, 33), torch.bfloat16, weight_dtype=torch.float32, device=device)
    y = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == ref.dtype == torch.float32
    # the normalised value is rounded to bf16 before the fp32 weight multiply, on both paths
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    assert not torch.equal(y, y.bfloat16().float())  # the weight multiply happened in fp32


def test_frozen_weight_skips_weight_grad():
    x, w = _inputs((6, 50), torch.float32)
    w.requires_grad_(False)
    y = rms_norm(x, w, 1e-5, backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    (dxr,) = torch.autograd.grad(rms_norm_reference(x, w, 1e-5).sum(), (x,))
    torch.testing.assert_close(dx, dxr, rtol=1e-5, atol=1e-5)
    assert w.grad is None


def test_module_takes_over_weight_and_eps_of_llama_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(40, eps=1e-4)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    ours = RMSNorm.from_module(hf, backend="triton")
    assert ours.weight is hf.weight and ours.variance_epsilon == 1e-4
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    assert list(ours.state_dict()) == ["weight"]


def test_auto_backend_on_cpu_runs_the_reference():
    x, w = _inputs((2, 8), torch.float32)
    y = rms_norm(x, w, 1e-5, backend="auto")
    assert type(y.grad_fn).__name__ != "RMSNormFunctionBackward"


# -- fused residual add + RMSNorm ---------------------------------------------------------------


def _add_inputs(m: int, h: int, dtype, device, strided: bool = False):
    x = (torch.randn(m, 2 * h if strided else h) * 2).to(device, dtype)
    x = (x[:, ::2] if strided else x).requires_grad_()  # strided: unit stride lost on H
    r = (torch.randn(m, h) + 0.5).to(device, dtype).requires_grad_()
    w = (torch.rand(h) + 0.5).to(device, dtype).requires_grad_()
    return x, r, w


def _add_norm_grads(fn, x, r, w, dy, ds_out):
    y, s = fn(x, r, w, 1e-6)
    return (y, s) + torch.autograd.grad((y * dy).sum() + (s * ds_out).sum(), (x, r, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,h", [(1, 352), (7, 96), (129, 352), (5, 97)])
def test_add_rmsnorm_forward_and_grads_match_reference(m, h, dtype, device):
    """y, s, dx, dresidual, dw against float64 (and, fp32, against the torch path it replaces),
    with gradients reaching s both through y and directly (ds_out: s's later residual use)."""
    x, r, w = _add_inputs(m, h, dtype, device, strided=h == 97)
    dy, ds_out = torch.randn(m, h, device=device, dtype=dtype), torch.randn(m, h, device=device, dtype=dtype)
    got = _add_norm_grads(lambda *a: add_rms_norm(*a, backend="triton"), x, r, w, dy, ds_out)
    assert type(got[0].grad_fn).__name__ == "AddRMSNormFunctionBackward"
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
    want = _add_norm_grads(add_rms_norm_reference, *leaves64, dy.double(), ds_out.double())
    for name, g, ref in zip(("y", "s", "dx", "dresidual", "dw"), got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, ref) < TOL[dtype], name
    if dtype == torch.float32:
        ref = _add_norm_grads(lambda *a: add_rms_norm(*a, backend="torch"), x, r, w, dy, ds_out)
        for name, g, rg in zip(("y", "s", "dx", "dresidual", "dw"), got, ref):
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-4 if name == "dw" else 1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,h", [(7, 96), (129, 352)])
def test_rmsnorm_passing_its_input_through_sums_its_gradient(m, h, dtype, device):
    """No residual: s is x itself (an alias), and x's gradient from the use of s is summed into the
    norm's dx by the backward kernel: dx = ds_out + norm grad, against float64 and torch."""
    x, _, w = _add_inputs(m, h, dtype, device)
    dy, ds_out = torch.randn(m, h, device=device, dtype=dtype), torch.randn(m, h, device=device, dtype=dtype)
    y, s = add_rms_norm(x, None, w, 1e-6, backend="triton")
    assert torch.equal(s, x) and type(y.grad_fn).__name__ == "AddRMSNormFunctionBackward"
    got = (y,) + torch.autograd.grad((y * dy).sum() + (s * ds_out).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-6)
    want = (y64,) + torch.autograd.grad((y64 * dy.double()).sum() + (x64 * ds_out.double()).sum(), (x64, w64))
    for name, g, ref in zip(("y", "dx", "dw"), got, want):
        assert g.dtype == dtype and rel_err(g, ref) < TOL[dtype], name


@pytest.mark.parametrize("use", ["y", "s"])
def test_add_rmsnorm_one_output_used(use):
    """Only y (no ds_out: the plain norm backward) or only s (dx = dr = ds_out, no dw) reaches the loss."""
    x, r, w = _add_inputs(6, 40, torch.float32, "cpu")
    grads = []
    for backend in ("triton", "torch"):
        for t in (x, r, w):
            t.grad = None
        y, s = add_rms_norm(x, r, w, 1e-5, backend=backend)
        (y if use == "y" else s).pow(2).sum().backward()
        grads.append([t.grad for t in (x, r, w)])
    (gx, gr, gw), (rx, rr, rw) = grads
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, rr, rtol=1e-5, atol=1e-5)
    if use == "y":
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)
    else:
        assert gw is None and rw is None


def test_add_rmsnorm_frozen_weight_and_mixed_dtypes():
    """A frozen weight gets no gradient; x bf16 + residual fp32 gives s fp32 (torch's promotion),
    dx in bf16 and dresidual in fp32."""
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 64, requires_grad=True)
    w = torch.rand(64) + 0.5
    y, s = add_rms_norm(x, r, w, 1e-6, backend="triton")
    yr, sr = add_rms_norm_reference(x, r, w, 1e-6)
    assert s.dtype == sr.dtype == torch.float32 and y.dtype == yr.dtype
    torch.testing.assert_close(s, sr)
    assert rel_err(y, yr) < 1e-5
    dx, dr = torch.autograd.grad(y.sum() + s.sum(), (x, r))
    dxr, drr = torch.autograd.grad(yr.sum() + sr.sum(), (x, r))
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32
    assert rel_err(dr, drr) < 1e-5 and rel_err(dx, dxr) < TOL[torch.bfloat16]


def test_add_rmsnorm_saves_s_and_rstd_only():
    """Saved for backward (saved-tensor hooks): s (M, H), the weight and rstd (M,) fp32 — the bytes
    the unfused add + RMSNorm keep, and neither input."""
    m, h = 9, 48
    x, r, w = _add_inputs(m, h, torch.float32, "cpu")
    saved = {}
    for fused in (True, False):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, seen=seen: seen.append(t) or t, lambda t: t):
            if fused:
                y, s = add_rms_norm(x, r, w, 1e-6, backend="triton")
            else:
                s = x + r
                y = rms_norm(s, w, 1e-6, backend="triton")
        saved[fused] = sorted(t.numel() * t.element_size() for t in seen)
        if fused:
            assert not any(t.data_ptr() in (x.data_ptr(), r.data_ptr()) for t in seen)
            assert any(t.data_ptr() == s.data_ptr() for t in seen)
    assert saved[True] == saved[False] == sorted([m * h * 4, h * 4, m * 4])


def test_module_with_residual_is_the_fused_add():
    norm = RMSNorm(32, eps=1e-5, backend="triton")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    y, s = norm(x, r)
    assert y.shape == s.shape == (2, 3, 32)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r), rtol=1e-6, atol=1e-6)
    y_auto, _ = RMSNorm.from_module(norm, backend="auto")(x.requires_grad_(), r)  # CPU: the reference
    assert type(y_auto.grad_fn).__name__ != "AddRMSNormFunctionBackward"


# -- fp32-weight weighting (Gemma's 1 + w, OLMo2's w) -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1.0, 0.0])
@pytest.mark.parametrize("m,h", [(7, 96), (129, 97)])
def test_fp32_weight_rmsnorm_matches_reference(m, h, offset, dtype, device):
    """y = (x_f32 * rstd * (offset + w_f32)).to(x.dtype): plain and fused-add forms against float64
    (y, s, dx, dresidual, dw; the offset is a constant, so dw is the gradient of w itself), and in
    fp32 against the torch path."""
    x, r, w = _add_inputs(m, h, dtype, device)
    w.data.sub_(1.0)  # Gemma's stored weights sit around 0 (the effective weight is 1 + w)
    dy, ds_out = torch.randn(m, h, device=device, dtype=dtype), torch.randn(m, h, device=device, dtype=dtype)
    mode = {"offset": offset, "weight_fp32": True}
    y = rms_norm(x, w, 1e-6, backend="triton", **mode)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward" and y.dtype == dtype
    got = (y,) + torch.autograd.grad(y, (x, w), dy)
    got_add = _add_norm_grads(lambda *a: add_rms_norm(*a, backend="triton", **mode), x, r, w, dy, ds_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
    y64 = rms_norm_reference(leaves64[0], leaves64[2], 1e-6, **mode)
    want = (y64,) + torch.autograd.grad(y64, (leaves64[0], leaves64[2]), dy.double())
    want_add = _add_norm_grads(lambda *a: add_rms_norm_reference(*a, **mode), *leaves64, dy.double(), ds_out.double())
    for name, g, ref in zip(("y", "dx", "dw", "add y", "add s", "add dx", "add dr", "add dw"),
                            got + got_add, want + want_add):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert rel_err(g, ref) < TOL[dtype], name
    if dtype == torch.float32:
        yr = rms_norm(x, w, 1e-6, backend="torch", **mode)
        for name, g, rg in zip(("y", "dx", "dw"), got, (yr,) + torch.autograd.grad(yr, (x, w), dy)):
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-4 if name == "dw" else 1e-5, msg=name)


def test_fp32_weight_bf16_rounds_once_after_the_weight():
    """bf16 x with bf16 weight: the product is formed in fp32 and rounded once (Gemma, OLMo2), which
    is not Llama's rounding of the normalised x before the weight."""
    x, w = _inputs((4, 256), torch.bfloat16)
    with torch.no_grad():
        w.copy_(torch.linspace(-0.9, 0.9, 256))
    gemma = rms_norm(x, w, 1e-6, backend="triton", offset=1.0, weight_fp32=True)
    torch.testing.assert_close(gemma, rms_norm_reference(x, w, 1e-6, offset=1.0, weight_fp32=True), rtol=0, atol=0.0625)
    n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))
    once = (n * (1 + w.float())).to(torch.bfloat16)
    twice = (n.to(torch.bfloat16) * (1 + w)).to(torch.bfloat16)
    assert torch.equal(rms_norm_reference(x, w, 1e-6, offset=1.0, weight_fp32=True), once)
    assert not torch.equal(once, twice)  # the two weightings differ in bf16 ...
    assert (gemma.float() - once.float()).abs().max() <= (gemma.float() - twice.float()).abs().max()  # ... ours is Gemma's


@pytest.mark.parametrize("cls_path,offset", [("gemma2.modeling_gemma2.Gemma2RMSNorm", 1.0),
                                             ("gemma3.modeling_gemma3.Gemma3RMSNorm", 1.0),
                                             ("olmo2.modeling_olmo2.Olmo2RMSNorm", 0.0)])
def test_module_takes_over_gemma_and_olmo2_norms(cls_path, offset):
    import importlib

    mod, cls = cls_path.rsplit(".", 1)
    hf = getattr(importlib.import_module(f"transformers.models.{mod}"), cls)(40, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    ours = RMSNorm.from_module(hf, backend="triton", offset=offset, weight_fp32=True)
    assert ours.weight is hf.weight and ours.variance_epsilon == 1e-5 and list(ours.state_dict()) == ["weight"]
    x = torch.randn(2, 3, 40, requires_grad=True)
    y, yr = ours(x), hf(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g, gr = (torch.autograd.grad(t.square().sum(), (x, hf.weight)) for t in (y, yr))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_offset_needs_the_fp32_weighting():
    with pytest.raises(ValueError, match="weight_fp32"):
        rms_norm(torch.randn(2, 8), torch.zeros(8), 1e-6, backend="torch", offset=1.0)
