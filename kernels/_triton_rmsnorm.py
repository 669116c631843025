"""Triton RMSNorm kernels (plain, and fused with the residual add before it) and their launchers
(imported lazily by ``rmsnorm.py``; needs triton).

Forward: one program per row (the whole hidden dim in registers, fp32 accumulation), stores the
per-row ``rstd`` (fp32, 4 bytes/row) for the backward. Backward: a persistent grid of about one
program per SM; each walks a contiguous run of rows, writes dx, and accumulates its partial
weight gradient in fp32 registers; the (P, H) partials are summed by torch afterwards. Memory
traffic is the floor for the op: fwd reads x + w, writes y; bwd reads dy + x (+ w), writes dx.

The fused residual add is the same two kernels with a constexpr switch: the forward also reads
the residual r and writes s = x + r (the new residual stream, which it then normalises); the
backward also reads ds_out (the gradient reaching s from its later use) and adds it to dx.
Fused traffic: fwd reads x + r, writes s + y; bwd reads dy + ds_out + s, writes ds — against an
unfused add + norm that also reads s once more forward and adds the two gradients in a separate pass.

Two more constexprs give the weighting of other families (see ``rmsnorm.py``): ``OFFSET`` (the
weight is OFFSET + w: Gemma's 1 + w) and ``W_FP32`` (the normalised row is multiplied by the weight in
fp32 and only the product is cast to the input dtype: Gemma, OLMo2; otherwise Llama's cast first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import sm_count


@triton.jit
def _rmsnorm_fwd_kernel(X, R, S, W, Y, RSTD, stride_x, stride_r, stride_s, stride_y, H, eps,
                        BLOCK: tl.constexpr, ADD: tl.constexpr, OFFSET: tl.constexpr, W_FP32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # s = x + r, rounded to s's dtype and normalised as stored (what torch's add then norm do)
        s = (x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    n = x * rstd
    if not W_FP32:  # Llama: normalise in fp32, cast back to the input dtype, then scale by the weight
        n = n.to(S.dtype.element_ty).to(tl.float32)  # (S is the norm's input: s when fused, X otherwise)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + OFFSET
    tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(DY, DS, X, W, RSTD, DX, DW_PART, stride_dy, stride_ds, stride_x, stride_dx, N, H,
                        rows_per_prog, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr, ADD_DS: tl.constexpr,
                        OFFSET: tl.constexpr, W_FP32: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + OFFSET  # d(OFFSET + w)/dw = 1
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog  # int64 row offsets: N*H may exceed 2^31
    end = tl.minimum(start + rows_per_prog, N)
    for row in range(start, end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = x * rstd
        dn = dy * w
        # dx = rstd * (dn - n * mean(dn * n))   (derivation in rmsnorm.py)
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / H))
        if ADD_DS:  # fused add: ds = ds_out + dx (X holds s here)
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if W_FP32:
                dw += dy * n
            else:  # the weight multiplied the rounded n
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _settings(h: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of ``h`` elements: the whole row in one block."""
    block = triton.next_power_of_2(h)
    if block > 65536:
        raise ValueError(f"rms_norm: hidden size {h} > 65536 is not supported by the Triton kernel")
    warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, warps


def _num_programs(device: torch.device, n_rows: int) -> int:
    return max(1, min(n_rows, sm_count(device)))


def _forward(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float, offset: float,
             w_fp32: bool):
    """Both forwards: (y, s or None, rstd); r None = plain RMSNorm (x stands in for r and s)."""
    n_rows, h = x.shape
    s = None if r is None else torch.empty((n_rows, h), dtype=torch.promote_types(x.dtype, r.dtype),
                                           device=x.device)
    norm_in = x if s is None else s
    y_dtype = norm_in.dtype if w_fp32 else torch.promote_types(norm_in.dtype, w.dtype)
    y = torch.empty((n_rows, h), dtype=y_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    r_ = x if r is None else r
    block, warps = _settings(h)
    _rmsnorm_fwd_kernel[(n_rows,)](x, r_, norm_in, w, y, rstd, x.stride(0), r_.stride(0), norm_in.stride(0),
                                   y.stride(0), h, eps, BLOCK=block, ADD=r is not None, OFFSET=float(offset),
                                   W_FP32=w_fp32, num_warps=warps)
    return y, s, rstd


def _backward(dy: torch.Tensor, ds_out: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor,
              rstd: torch.Tensor, compute_dw: bool, offset: float,
              w_fp32: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both backwards: (dx [+ ds_out], dw or None); ds_out None = plain RMSNorm."""
    n_rows, h = x.shape
    dx = torch.empty_like(x)
    if n_rows == 0:
        return dx, (torch.zeros_like(w) if compute_dw else None)
    progs = _num_programs(x.device, n_rows)
    rows_per_prog = triton.cdiv(n_rows, progs)
    dw_part = torch.empty((progs, h) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    ds = dy if ds_out is None else ds_out
    block, warps = _settings(h)
    _rmsnorm_bwd_kernel[(progs,)](dy, ds, x, w, rstd, dx, dw_part, dy.stride(0), ds.stride(0), x.stride(0),
                                  dx.stride(0), n_rows, h, rows_per_prog, BLOCK=block, COMPUTE_DW=compute_dw,
                                  ADD_DS=ds_out is not None, OFFSET=float(offset), W_FP32=w_fp32,
                                  num_warps=warps)
    return dx, (dw_part.sum(0).to(w.dtype) if compute_dw else None)


def rmsnorm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0,
                w_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, H) with unit stride on H; w: (H,). Returns y (N, H) in promote(x, w) dtype (x's
    dtype with ``w_fp32``) and rstd (N,) fp32."""
    y, _, rstd = _forward(x, None, w, eps, offset, w_fp32)
    return y, rstd


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                compute_dw: bool, offset: float = 0.0,
                w_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, x: (N, H); w: (H,); rstd: (N,). Returns dx (N, H) in x.dtype and dw (H,) in w.dtype
    (None when ``compute_dw`` is False, e.g. frozen norms in QLoRA)."""
    return _backward(dy, None, x, w, rstd, compute_dw, offset, w_fp32)


def add_rmsnorm_fwd(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0,
                    w_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, r: (N, H) with unit stride on H; w: (H,). Returns y = rmsnorm(s) * w (N, H) in
    promote(s, w), s = x + r (N, H) in promote(x, r) and rstd (N,) fp32 (of s)."""
    y, s, rstd = _forward(x, r, w, eps, offset, w_fp32)
    assert s is not None
    return y, s, rstd


def add_rmsnorm_bwd(dy: torch.Tensor, ds_out: torch.Tensor, s: torch.Tensor, w: torch.Tensor,
                    rstd: torch.Tensor, compute_dw: bool, offset: float = 0.0,
                    w_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, ds_out, s: (N, H); w: (H,); rstd: (N,). Returns ds = ds_out + d(norm)/ds^T dy (N, H) in
    s.dtype (the gradient of both x and r) and dw (H,) in w.dtype (None unless ``compute_dw``)."""
    return _backward(dy, ds_out, s, w, rstd, compute_dw, offset, w_fp32)
