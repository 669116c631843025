"""Causal-LM loss without full fp32 logits: final hidden states -> chunked linear + cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.kernels.cross_entropy import linear_cross_entropy


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack that returns hidden states (``model.model`` for Llama-style models)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    return model.get_decoder()


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of ``batch`` and the number of tokens it covers.

    Args:
        batch: ``input_ids`` (B,T), ``labels`` (B,T) aligned with the inputs (-100 = no loss; the
            shift happens here), optional ``attention_mask`` (B,T) or 4-D mask, ``position_ids`` (B,T).
    Returns:
        (loss_sum, n_tokens): () fp32 differentiable sum over predicted tokens, () int64 count.
        Divide by the total count over all micro-batches of a step for a token-mean loss.
    """
    kwargs: dict[str, Any] = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    out = decoder(model)(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    h = hidden[:, :-1, :]                                                # (B, T-1, H) predicts t+1
    y = batch["labels"][:, 1:].to(h.device)                               # (B, T-1)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(h, head.weight, y, chunk_size=chunk_size, ignore_index=IGNORE_INDEX,
                                    backend=backend)
    return _module_head_loss(head, h, y, chunk_size or 1024)


def _module_head_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback for an output layer that is not a plain bias-free ``nn.Linear`` (e.g. adapted or
    quantized): logits one chunk of rows at a time, recomputed in backward (checkpointed)."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hc).float(), yc, ignore_index=IGNORE_INDEX, reduction="sum")

    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    total = h2.new_zeros((), dtype=torch.float32)
    for s in range(0, h2.shape[0], chunk):
        total = total + checkpoint(piece, h2[s:s + chunk], y2[s:s + chunk], use_reentrant=False)
    return total, (y2 != IGNORE_INDEX).sum()
