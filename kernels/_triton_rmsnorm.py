"""Triton RMSNorm kernels and their launchers (imported lazily by ``rmsnorm.py``; needs triton).

Forward: one program per row (the whole hidden dim in registers, fp32 accumulation), stores the
per-row ``rstd`` (fp32, 4 bytes/row) for the backward. Backward: a persistent grid of about one
program per SM; each walks a contiguous run of rows, writes dx, and accumulates its partial
weight gradient in fp32 registers; the (P, H) partials are summed by torch afterwards. Memory
traffic is the floor for the op: fwd reads x + w, writes y; bwd reads dy + x (+ w), writes dx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import sm_count


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    # Llama semantics: normalise in fp32, cast back to the input dtype, then scale by the weight.
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, N, H,
                        rows_per_prog, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
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
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
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


def rmsnorm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, H) with unit stride on H; w: (H,). Returns y (N, H) in promote(x, w) dtype and
    rstd (N,) fp32."""
    n_rows, h = x.shape
    y = torch.empty((n_rows, h), dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block, warps = _settings(h)
    _rmsnorm_fwd_kernel[(n_rows,)](x, w, y, rstd, x.stride(0), y.stride(0), h, eps,
                                   BLOCK=block, num_warps=warps)
    return y, rstd


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, x: (N, H); w: (H,); rstd: (N,). Returns dx (N, H) in x.dtype and dw (H,) in w.dtype
    (None when ``compute_dw`` is False, e.g. frozen norms in QLoRA)."""
    n_rows, h = x.shape
    dx = torch.empty_like(x)
    if n_rows == 0:
        return dx, (torch.zeros_like(w) if compute_dw else None)
    progs = _num_programs(x.device, n_rows)
    rows_per_prog = triton.cdiv(n_rows, progs)
    dw_part = torch.empty((progs, h) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    block, warps = _settings(h)
    _rmsnorm_bwd_kernel[(progs,)](dy, x, w, rstd, dx, dw_part, dy.stride(0), x.stride(0),
                                  dx.stride(0), n_rows, h, rows_per_prog, BLOCK=block,
                                  COMPUTE_DW=compute_dw, num_warps=warps)
    return dx, (dw_part.sum(0).to(w.dtype) if compute_dw else None)
