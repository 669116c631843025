"""Chunked fused linear + cross-entropy: the loss of ``hidden @ weight^T`` without full logits.

For hidden h (N, H), lm_head weight W (V, H), labels y (N,) (``ignore_index`` rows masked):

    loss_sum = sum_{i: y_i != ignore} ( logsumexp_j z_ij - z_{i,y_i} ),     z = h @ W^T (N, V)

Rows are processed ``chunk`` at a time (Liger-Kernel's FusedLinearCrossEntropy idea): the (C, V)
logits of one chunk are computed in the activation dtype, their per-row loss and gradient
G = softmax(z) - onehot(y) (zero rows where ignored) are formed right away, and then

    dL/dh[chunk] = G @ W            (C, H)
    dL/dW       += G^T @ h[chunk]    (V, H)  (only when W requires grad; fp32 accumulator)

so peak extra memory is one (C, V) chunk instead of (N, V) fp32 logits + their gradient. The
gradients are computed in the forward (cheaper than recomputing the logits) and scaled by the
incoming grad of ``loss_sum`` in the backward. Under ``torch.no_grad`` / frozen inputs only the
loss is computed. The per-chunk loss/gradient op is a Triton kernel that overwrites the logits
chunk in place (``_triton_ce.py``), or the torch reference below (CPU fallback).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backend import resolve_backend


# Each chunk re-reads W (V, H) twice (logits, dh): a chunk of C rows does 4*C*H*V FLOPs on
# 4*H*V bytes of bf16 W, i.e. C FLOP/byte; Hopper's ridge is ~800 TFLOP/s / 3 TB/s ~ 270, so
# chunks of fewer than ~256 rows turn the lm_head GEMMs memory-bound (128k vocab: W is 1 GB).
MIN_CHUNK_ROWS = 256


# With free device memory known, a chunk's workspace may use this fraction of it.
FREE_FRACTION = 0.25


def auto_chunk_size(n: int, vocab: int, hidden: int, free_bytes: int | None = None, elt_bytes: int = 2) -> int:
    """Rows per chunk.

    ``free_bytes`` None (the CPU, the memory estimate): a (C, V) logits chunk about the size of h
    (N, H) (Liger's rule), but at least ``MIN_CHUNK_ROWS`` so the GEMMs stay compute-bound (128k
    vocab: a 64 MiB bf16 chunk). ``free_bytes`` given (CUDA free memory): as many rows as fit in
    ``FREE_FRACTION`` of it, each row costing V * (``elt_bytes`` logits + 4 fp32 workspace), at
    least ``MIN_CHUNK_ROWS`` and at most ``n`` — fewer, larger lm_head GEMMs when memory allows."""
    if free_bytes is not None:
        rows = int(free_bytes * FREE_FRACTION) // max(1, vocab * (elt_bytes + 4))
        return max(1, min(n, max(rows, MIN_CHUNK_ROWS)))
    liger = math.ceil(n / max(1, math.ceil(vocab / hidden)))
    return max(1, min(n, max(liger, MIN_CHUNK_ROWS)))


def free_device_bytes(device: torch.device) -> int | None:
    """Memory this process may still take on a CUDA ``device``; None elsewhere: the device's free
    memory (``torch.cuda.mem_get_info``), but under a ``torch.cuda.set_per_process_memory_fraction``
    cap at most the cap minus what the allocator holds in tensors (the card may be far emptier than
    the cap allows: 8B/128k under a 24 GB cap on an 80 GB card)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
    cap = fraction(device) if fraction is not None else 1.0
    if cap < 1.0:
        free = min(free, max(0, int(total * cap) - torch.cuda.memory_allocated(device)))
    return free


def _ce_chunk_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                    write_grad: bool) -> torch.Tensor:
    """Reference chunk op: per-row losses (C,) fp32; overwrites ``logits`` (C, V) with the
    gradient when ``write_grad``. Uses one fp32 (C, V) temporary."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (C,)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).long()
    loss = (lse - z.gather(1, y[:, None])[:, 0]) * valid
    if write_grad:
        g = z.sub_(lse[:, None]).exp_()  # softmax, in place in the fp32 temporary
        g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
        g.mul_(valid[:, None])
        logits.copy_(g)
    return loss


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                           ignore_index: int, use_triton: bool, need_dh: bool, need_dw: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop. hidden (N, H), weight (V, H), labels (N,). Returns loss_sum () fp32,
    dL/dh (N, H) in hidden's dtype or None, dL/dW (V, H) fp32 or None (for grad_loss = 1)."""
    write_grad = need_dh or need_dw
    dtype = weight.dtype
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if use_triton:
        from ._triton_ce import ce_chunk
    else:
        ce_chunk = _ce_chunk_torch
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk].to(dtype)  # (C, H)
        logits = h @ weight.t()  # (C, V) in the weight's (activation) dtype
        loss += ce_chunk(logits, labels[s:s + chunk], ignore_index, write_grad).sum()
        if need_dh:
            torch.mm(logits, weight, out=dh[s:s + chunk])  # logits now holds G (C, V)
        if need_dw:
            dw.addmm_(logits.t().float(), h.float())
        del logits  # else the next chunk's logits are allocated while these are still alive (2 chunks)
    return loss, dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    """forward(hidden (N, H), weight (V, H), labels (N,), chunk, ignore_index, use_triton)
    -> loss_sum () fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                ignore_index: int, use_triton: bool) -> torch.Tensor:
        loss, dh, dw = chunked_loss_and_grads(hidden, weight, labels, chunk, ignore_index, use_triton,
                                              ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw = ctx.saved_tensors
        d_hidden = dh * grad_loss.to(dh.dtype) if dh is not None else None
        d_weight = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None
        return d_hidden, d_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_size: int = 0, ignore_index: int = -100,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of ``hidden @ weight^T`` against ``labels``, chunked.

    Args:
        hidden: (N, H) final hidden states (any leading dims are flattened).
        weight: (V, H) lm_head weight (frozen or trainable).
        labels: (N,) int targets; ``ignore_index`` entries contribute no loss and no gradient.
        chunk_size: rows per chunk; 0 = :func:`auto_chunk_size` (from the free memory on CUDA).
        backend: ``auto|triton|torch`` (see :func:`dispatch.resolve_backend`).
    Returns:
        (loss_sum, n_valid): () fp32 differentiable sum, () int64 count of non-ignored labels.
    """
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).contiguous()  # the Triton kernel indexes labels with unit stride
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} hidden rows but {y.shape[0]} labels")
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(
        h2.shape[0], weight.shape[0], weight.shape[1], free_device_bytes(hidden.device), weight.element_size())
    use_triton = resolve_backend(backend, hidden.device, "cross_entropy") == "triton"
    n_valid = (y != ignore_index).sum()
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(h2, weight, y, chunk, ignore_index, use_triton), n_valid
    loss, _, _ = chunked_loss_and_grads(h2, weight, y, chunk, ignore_index, use_triton, False, False)
    return loss, n_valid


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Test oracle: full fp32 logits and ``F.cross_entropy(reduction="sum")``."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    logits = (h2.to(weight.dtype) @ weight.t()).float()
    loss = F.cross_entropy(logits, y.long(), ignore_index=ignore_index, reduction="sum")
    return loss, (y != ignore_index).sum()
