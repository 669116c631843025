"""Trainable rows for tokens added to the vocabulary (chat-template markers, ``data.marker_tokens: add``).

A resized embedding's new rows start as the mean of the old ones (transformers' resize) or random
(``random:`` models) and mean nothing; they must train. Training the whole (V, H) table would cost
V*H gradients and optimizer state, so only the new rows train, as in PEFT's Trainable Tokens: the
input embedding and (untied) output layer are replaced by :class:`TrainableTokens`, which holds the
full values of the selected rows in ``trainable_tokens_delta`` (n, H) and uses them in place of the
frozen rows. A tied output layer shares the embedding's parameter.

Saved with the adapter in PEFT's format (``peft.PeftModel.from_pretrained`` loads it)::

    adapter_config.json: "trainable_token_indices": [ids]                     (tied embeddings)
                         {"embed_tokens": [ids], "lm_head": [ids]}           (untied)
    base_model.model.<module>.token_adapter.trainable_tokens_delta   (n, H)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.modules import replace_module

log = logging.getLogger(__name__)

DELTA = "trainable_tokens_delta"
PEFT_SUFFIX = f".token_adapter.{DELTA}"


class TrainableTokens(nn.Module):
    """``base`` (an ``nn.Embedding`` or a bias-free output ``nn.Linear``) with rows ``token_indices``
    replaced by the trainable ``trainable_tokens_delta`` (n, H); everything else stays frozen."""

    def __init__(self, base: nn.Module, token_indices: list[int], delta: nn.Parameter | None = None) -> None:
        super().__init__()
        if not isinstance(base, (nn.Embedding, nn.Linear)) or getattr(base, "bias", None) is not None:
            raise TypeError(f"TrainableTokens wraps an nn.Embedding or a bias-free nn.Linear, got {type(base).__name__}")
        self.base = base
        base.weight.requires_grad_(False)  # only the selected rows train
        idx = torch.tensor(sorted(set(token_indices)), dtype=torch.long, device=base.weight.device)
        self.register_buffer("token_indices", idx, persistent=False)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=idx.device)
        slot[idx] = torch.arange(len(idx), device=idx.device)
        self.register_buffer("slot", slot, persistent=False)  # (V,) token id -> row of the delta, -1 = frozen
        self.tied = delta is not None
        self.trainable_tokens_delta = delta if delta is not None else \
            nn.Parameter(base.weight.detach()[idx].clone())  # (n, H) full values of the rows

    @property
    def weight(self) -> torch.Tensor:
        """The effective (V, H) weight (a copy; for merging and inspection, not the forward)."""
        return self.base.weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(self.base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.trainable_tokens_delta
        if isinstance(self.base, nn.Embedding):   # x: (B, T) ids -> (B, T, H)
            out = self.base(x)
            s = self.slot[x]
            return torch.where((s >= 0).unsqueeze(-1), delta.to(out.dtype)[s.clamp(min=0)], out)
        out = self.base(x)                          # x: (..., H) -> logits (..., V)
        return out.index_copy(-1, self.token_indices, F.linear(x, delta.to(x.dtype)))


def make_tokens_trainable(model: nn.Module, token_ids: list[int]) -> list[str]:
    """Replace the input embedding and the output layer by :class:`TrainableTokens` over ``token_ids``.
    Returns the replaced module names. In place; call after LoRA injection, before the optimizer."""
    if not token_ids:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_emb = TrainableTokens(emb, token_ids)
    replace_module(model, names[id(emb)], new_emb)
    done = [names[id(emb)]]
    if head is not None:
        new_head = TrainableTokens(head, token_ids, delta=new_emb.trainable_tokens_delta if tied else None)
        replace_module(model, names[id(head)], new_head)
        done.append(names[id(head)])
    log.info("training %d new token rows of %s%s", len(new_emb.token_indices), " and ".join(done),
             " (tied)" if tied else "")
    return done


def peft_token_key(param_name: str, prefix: str) -> str | None:
    """PEFT file key of a ``<module>.trainable_tokens_delta`` parameter name (None for other names)."""
    if not param_name.endswith(f".{DELTA}"):
        return None
    return f"{prefix}{param_name.removesuffix(f'.{DELTA}')}{PEFT_SUFFIX}"


def token_layers(model: nn.Module) -> dict[str, TrainableTokens]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TrainableTokens)}


def peft_token_entries(model: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], object]:
    """PEFT-keyed tensors and the ``trainable_token_indices`` config value (None when there are none).
    A tied layer is saved once, under the embedding."""
    layers = token_layers(model)
    if not layers:
        return {}, None
    tensors = {f"{prefix}{n}{PEFT_SUFFIX}": m.trainable_tokens_delta.detach().to("cpu").contiguous()
               for n, m in layers.items() if not m.tied}
    ids = next(iter(layers.values())).token_indices.tolist()
    if any(m.tied for m in layers.values()):
        return tensors, ids
    return tensors, {n.rsplit(".", 1)[-1]: m.token_indices.tolist() for n, m in layers.items()}


def load_token_rows(model: nn.Module, tensors: dict[str, torch.Tensor], indices: object, prefix: str,
                    where: str) -> list[str]:
    """Apply an adapter's saved token rows (``tensors``: the PEFT ``...token_adapter.trainable_tokens_delta``
    entries; ``indices``: its ``trainable_token_indices``) to ``model``, frozen. Returns the module names."""
    if not tensors:
        return []
    if token_layers(model):
        raise QloraError(f"{where}: the model already has added-token rows from another adapter; load one such "
                         "adapter at a time")
    ids = indices if isinstance(indices, list) else next(iter(dict(indices or {}).values()), None)
    if not ids:
        raise QloraError(f"{where}: token rows saved but adapter_config.json has no trainable_token_indices")
    done = make_tokens_trainable(model, list(ids))
    layers = token_layers(model)
    with torch.no_grad():
        for key, t in tensors.items():
            name = key.removeprefix(prefix).removesuffix(PEFT_SUFFIX)
            if name not in layers or layers[name].trainable_tokens_delta.shape != t.shape:
                raise QloraError(f"{where}: token rows {key!r} {tuple(t.shape)} do not fit this model")
            layers[name].trainable_tokens_delta.copy_(t)
    for m in layers.values():
        m.trainable_tokens_delta.requires_grad_(False)
    return done


def merge_token_rows(model: nn.Module) -> None:
    """Write the trained rows into the wrapped tables and put the plain modules back (for ``merge``)."""
    for name, m in token_layers(model).items():
        with torch.no_grad():
            m.base.weight.index_copy_(0, m.token_indices, m.trainable_tokens_delta.to(m.base.weight))
        replace_module(model, name, m.base)
