"""Per-token log-probabilities of a batch's labels through the chunked linear path (never the full
``(B, T, V)`` logits), and the reference model's: the same NF4 base with the adapter switched off,
under ``no_grad`` (no second model in memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qlora_trainer.data.formats import IGNORE_INDEX
from qlora_trainer.lora.multi import disable_adapters
from qlora_trainer.models.loss import decoder
from qlora_trainer.kernels.token_logprobs import linear_token_logprobs


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next-token label of ``batch``.

    Args:
        batch: ``input_ids`` (B,T), ``labels`` (B,T) aligned with the inputs (-100 = not scored),
            optional ``attention_mask`` (B,T).
    Returns:
        (logps (B, T-1) fp32, 0 where not scored; mask (B, T-1) bool, True where scored).
    """

    kwargs: dict[str, Any] = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    out = decoder(model)(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    h = hidden[:, :-1, :]
    y = batch["labels"][:, 1:].to(h.device)
    mask = y != IGNORE_INDEX
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        return linear_token_logprobs(h, head.weight, y, chunk_size=chunk_size, ignore_index=IGNORE_INDEX), mask
    return _module_head_logps(head, h, y, chunk_size or 1024), mask


def _module_head_logps(head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """An output layer that is not a plain bias-free Linear: logits a chunk of rows at a time,
    recomputed in backward (checkpointed). h (B, T, H), y (B, T) -> (B, T) fp32."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        valid = yc != IGNORE_INDEX
        lp = F.log_softmax(head(hc).float(), -1).gather(-1, torch.where(valid, yc, 0)[:, None])[:, 0]
        return lp * valid

    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    parts = [checkpoint(piece, h2[s:s + chunk], y2[s:s + chunk], use_reentrant=False)
             for s in range(0, h2.shape[0], chunk)]
    return torch.cat(parts).reshape(y.shape)


@torch.no_grad()
def reference_token_logps(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = 0
                          ) -> torch.Tensor:
    """:func:`token_logps` of the reference policy: the base with every adapter off (so adapter
    dropout does not apply). Returns (B, T-1) fp32 without gradient."""
    with disable_adapters(model):
        logps, _ = token_logps(model, batch, chunk_size=chunk_size)
    return logps


def sequence_sums(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-prob (B,) and scored-token count (B,) fp32."""
    return (logps * mask).sum(-1), mask.sum(-1).float()
