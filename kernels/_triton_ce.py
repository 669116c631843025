"""Triton cross-entropy over one chunk of logits, gradient written in place (imported lazily).

One program per row of the (C, V) logits chunk (activation dtype, e.g. bf16). Pass 1 streams the
row in BLOCK_V slices with an online max / sum-exp in fp32 (never an fp32 copy of the row in
memory) and reads the target logit; pass 2 streams it again and overwrites it with the gradient
of the row's loss, softmax(z) - onehot(y), zeroed for ignored rows. Bytes moved: the chunk read
twice and written once — the logits buffer is reused as the gradient, so the chunk costs C*V*2
bytes of memory in bf16 in total. Math (z: logits row, y: target):
    lse = log sum_j exp(z_j);  loss = lse - z_y;  d loss / d z_j = exp(z_j - lse) - [j == y]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_chunk_kernel(LOGITS, LABELS, LOSS, stride_row, V, ignore_index,
                     WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    y = tl.load(LABELS + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    # masked so that a label >= V (a data bug) can never read past the row; such rows get z_y = 0
    z_y = tl.load(base + y_safe, mask=(y_safe >= 0) & (y_safe < V), other=0.0).to(tl.float32)
    w = valid.to(tl.float32)  # 0 for ignored rows: no loss, no gradient
    tl.store(LOSS + row, (lse - z_y) * w)
    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(cols == y_safe, 1.0, 0.0)
            tl.store(base + cols, (g * w).to(LOGITS.dtype.element_ty), mask=cols < V)


def ce_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """logits: (C, V) unit stride on V, overwritten with d loss_row / d logits when ``write_grad``;
    labels: (C,) int. Returns per-row losses (C,) fp32 (0 for ignored rows)."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(v), 4096 if logits.device.type == "cuda" else 256)
    _ce_chunk_kernel[(c,)](logits, labels, loss, logits.stride(0), v, ignore_index,
                           WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return loss
