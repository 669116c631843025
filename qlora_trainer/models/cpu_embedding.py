"""Keep the frozen input embedding table in (pinned) CPU memory (``performance.embeddings_on_cpu``).

LoRA never trains the input embeddings and a step reads only its B*T rows, so the table (Llama-3-70B:
128256 x 8192 bf16 = 1.96 GiB) can live in host memory: each forward gathers the rows on the CPU and
copies the (B, T, H) result to the GPU (B*T*H*2 bytes of PCIe per step, ~8 ms at 24k tokens for 70B).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in CPU memory, page-locked when CUDA is available (async host-to-device copies)."""
    if not torch.cuda.is_available():
        return t.cpu()
    if t.device.type == "cpu" and t.is_pinned():
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


class CpuEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table stays in CPU memory.

    ``weight`` (num_embeddings, embedding_dim) is a frozen parameter under the same name as
    ``nn.Embedding``'s, so state-dict keys (and adapter saving) are unchanged; ``num_embeddings``,
    ``embedding_dim`` and ``padding_idx`` are exposed like ``nn.Embedding``'s. ``.to(device)`` and dtype
    casts of the model keep the table on the CPU (dtype casts apply; a device move copies it there and
    back, so the device briefly holds it).
    """

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.weight = nn.Parameter(_host(emb.weight.detach()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 on any device -> (B, T, H) in the table's dtype on input_ids' device."""
        device = input_ids.device
        ids = input_ids.to(self.weight.device)
        if device == self.weight.device:
            return F.embedding(ids, self.weight, self.padding_idx)
        # gather straight into page-locked memory so the copy to the GPU is asynchronous (the caching
        # host allocator keeps the buffer until that copy is done)
        out = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype,
                          pin_memory=self.weight.is_pinned())
        torch.index_select(self.weight.detach(), 0, ids.reshape(-1), out=out)
        return out.view(*ids.shape, self.embedding_dim).to(device, non_blocking=True)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        w = self.weight.data
        if w.device.type != "cpu" or (torch.cuda.is_available() and not w.is_pinned()):
            self.weight.data = _host(w)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, device=cpu, pinned={self.weight.is_pinned()}"


def apply_cpu_embeddings(model: nn.Module) -> int:
    """Replace ``model.get_input_embeddings()`` with a :class:`CpuEmbedding` (module replacement via
    ``model.set_input_embeddings``). Returns the table's bytes now in CPU memory; 0 when already applied
    or skipped with a warning: tied to the output embeddings (the head needs it on the GPU), trainable,
    or not a plain ``nn.Embedding`` (e.g. scaled embeddings with their own forward).

    The wrapper is re-registered last in its parent so that the model's first parameter, whose device
    ``PreTrainedModel.device`` reports and ``generate`` moves inputs to, stays on the GPU.
    """
    emb = model.get_input_embeddings()
    if isinstance(emb, CpuEmbedding):
        return 0
    head = model.get_output_embeddings()
    why = ("it is not a plain nn.Embedding" if type(emb) is not nn.Embedding else
           "it is tied to the output embeddings (lm_head needs it on the device)"
           if getattr(head, "weight", None) is emb.weight else
           "it is trainable" if emb.weight.requires_grad else "")
    if why:
        log.warning("performance.embeddings_on_cpu: keeping the input embeddings on the device: %s", why)
        return 0
    wrapper = CpuEmbedding(emb)
    model.set_input_embeddings(wrapper)
    parent, name = next((m, n) for m in model.modules() for n, c in m.named_children() if c is wrapper)
    delattr(parent, name)
    setattr(parent, name, wrapper)
    nbytes = wrapper.weight.numel() * wrapper.weight.element_size()
    log.info("performance.embeddings_on_cpu: input embedding table (%.2f GiB) kept in CPU memory", nbytes / 2**30)
    return nbytes
