"""Chunked per-token log-probabilities of ``hidden @ weight^T``: the log-probs preference and RL
objectives need (one per token, not one summed loss), without full (N, V) logits.

For hidden h (N, H), lm_head weight W (V, H), labels y (N,) (``ignore_index`` rows give 0):

    lp_i = z_{i,y_i} - logsumexp_j z_ij,      z = h @ W^T (N, V)

Backward, for an incoming gradient g (N,) (one per row, so unlike the summed cross-entropy the
gradients cannot be formed in the forward and scaled afterwards):

    dlp_i/dz_i = onehot(y_i) - softmax(z_i)           G_i = g_i * (onehot(y_i) - softmax(z_i))
    dL/dh[chunk] = G @ W          (C, H)
    dL/dW       += G^T @ h[chunk]  (V, H)  fp32 accumulator, only when W requires grad

The logits of a chunk are recomputed in the backward (two (C, V) GEMMs more than keeping them), so
the peak extra memory is one (C, V) chunk in the forward and one in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cross_entropy import auto_chunk_size, free_device_bytes


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, ignore_index: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: returns (lp (C,) fp32, z (C, V) fp32 logits, lse (C,), valid (C,) bool)."""
    z = (h.to(weight.dtype) @ weight.t()).float()
    lse = torch.logsumexp(z, dim=-1)
    valid = y != ignore_index
    idx = torch.where(valid, y, 0).long()
    lp = (z.gather(1, idx[:, None])[:, 0] - lse) * valid
    return lp, z, lse, valid


class LinearLogprobsFunction(torch.autograd.Function):
    """forward(hidden (N, H), weight (V, H), labels (N,), chunk, ignore_index) -> log-probs (N,) fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                ignore_index: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            out[s:s + chunk] = _chunk_logprobs(hidden[s:s + chunk], weight, labels[s:s + chunk], ignore_index)[0]
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[s:s + ctx.chunk], labels[s:s + ctx.chunk]
            _, z, lse, valid = _chunk_logprobs(h, weight, y, ctx.ignore_index)
            g = z.sub_(lse[:, None]).exp_().neg_()  # -softmax, in place
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, torch.where(valid, y, 0).long()] += 1.0
            g.mul_((grad[s:s + ctx.chunk].float() * valid)[:, None])  # G (C, V)
            if need_dh:
                dh[s:s + ctx.chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_dw:
                dw.addmm_(g.t(), h.float())
            del z, g
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_size: int = 0, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``softmax(hidden @ weight^T)``, chunked.

    Args:
        hidden: (N, H) (any leading dims are flattened), weight: (V, H), labels: (N,) matching.
        chunk_size: rows per chunk; 0 = :func:`cross_entropy.auto_chunk_size`.
    Returns:
        (N,) fp32 (hidden's leading shape restored), 0 where ``labels == ignore_index``;
        differentiable in ``hidden`` and ``weight``.
    """
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_token_logprobs: {h2.shape[0]} hidden rows but {y.shape[0]} labels")
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(
        h2.shape[0], weight.shape[0], weight.shape[1], free_device_bytes(hidden.device), weight.element_size())
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return LinearLogprobsFunction.apply(h2, weight, y, chunk, ignore_index).reshape(lead)
    with torch.no_grad():
        return LinearLogprobsFunction.forward(_NoCtx(), h2, weight, y, chunk, ignore_index).reshape(lead)


class _NoCtx:
    """Stands in for autograd's ctx when the forward runs without autograd."""

    def save_for_backward(self, *_: torch.Tensor) -> None:
        pass


def linear_token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                    ignore_index: int = -100) -> torch.Tensor:
    """Test oracle: full fp32 logits, ``log_softmax`` and a gather; 0 at ignored labels."""
    z = (hidden.to(weight.dtype) @ weight.t()).float()
    valid = labels != ignore_index
    lp = F.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0).long()[..., None])[..., 0]
    return lp * valid
