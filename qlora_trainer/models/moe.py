"""Fused mixture-of-experts weights (transformers 5): find them, hold them in NF4, run them expert by expert.

In transformers 5 the experts of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, ... are one module holding
3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), called as
``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``. They are not
``nn.Linear``: bitsandbytes leaves them in 16 bits. :func:`quantize_experts` replaces each such
module by :class:`NF4Experts` (module replacement): the same two weights, each a bitsandbytes NF4
``Params4bit`` of the 2-D (E * out, in) view (double quant; one block layout for all experts,
``kernels/experts.py``), and a forward that dequantizes one expert at a time inside its matmul, W
recomputed in the backward (``kernels.lora_linear``), never all experts at once.

:func:`experts_forward` is that loop, shared by :class:`NF4Experts` and the LoRA wrapper
(``lora/experts.py``): per routed expert e with tokens x_e (n_e, H) and routing weights w_e (n_e,)::

    g, u = split(x_e @ Wgu[e]^T (+ LoRA))     (n_e, I) each
    y[tokens] += w_e * ((act(g) * u) @ Wd[e]^T (+ LoRA))
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from qlora_trainer.kernels.backend import resolve_backend
from qlora_trainer.kernels.base_weight import BaseWeight
from qlora_trainer.kernels.experts import expert_slice, experts_quantizable
from qlora_trainer.kernels.lora_linear import frozen_linear, lora_linear
from qlora_trainer.kernels.nf4 import NF4Weight

log = logging.getLogger(__name__)

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # in registration order (PEFT nests its wrappers in it)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 fused experts module we can run: 3-D ``gate_up_proj`` (E, 2I, H) and
    ``down_proj`` (E, H, I), an ``act_fn``, no biases, not transposed (e.g. not GPT-OSS's layout)."""
    if isinstance(module, NF4Experts):
        return True
    gu, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(d, torch.Tensor) and gu.dim() == 3 and d.dim() == 3):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or not hasattr(module, "act_fn"):
        return False
    e, two_i, h = gu.shape
    return two_i % 2 == 0 and tuple(d.shape) == (e, h, two_i // 2)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> fused experts module (16-bit or :class:`NF4Experts`). One wrapped by an
    adapter (``<name>.base_layer``, ``lora/experts.py``) is listed under the wrapper's name."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_fused_experts(module) and not any(name.startswith(n + ".") for n in out):
            out[name.removesuffix(".base_layer")] = module
    return out


def other_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> a module holding 3-D expert weights we cannot run (e.g. GPT-OSS's transposed
    ``gate_up_proj`` (E, H, 2I) with biases): they stay 16-bit and get no LoRA."""
    return {name: m for name, m in model.named_modules()
            if not is_fused_experts(m) and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
            and getattr(m, "gate_up_proj").dim() == 3}


class NF4Experts(nn.Module):
    """Frozen fused experts in NF4: ``gate_up_proj`` / ``down_proj`` are bitsandbytes ``Params4bit``
    of the 2-D views (E * 2I, H) / (E * H, I) (quant state: ``shape`` = the 2-D view). Same forward
    contract as transformers' experts modules. Build with :meth:`from_module`."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, *, num_experts: int,
                 act_fn: Callable, compute_dtype: torch.dtype, backend: str = "auto") -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj  # registration order = transformers'
        self.num_experts, self.act_fn = num_experts, act_fn
        self.compute_dtype, self.backend = compute_dtype, backend

    @classmethod
    def from_module(cls, experts: nn.Module, *, compute_dtype: torch.dtype, double_quant: bool = True,
                    blocksize: int = 64, quant_storage: torch.dtype = torch.uint8,
                    device: torch.device | str | None = None) -> "NF4Experts | None":
        """Quantize a fused experts module's two weights; None when an expert is not whole blocks."""
        import bitsandbytes as bnb

        weights = [getattr(experts, n) for n in EXPERT_PARAMS]
        if any(not experts_quantizable(w.shape[1], w.shape[2], blocksize) for w in weights):
            return None
        device = torch.device(device) if device is not None else weights[0].device
        params = []
        for w in weights:
            e, out_f, in_f = w.shape
            p = bnb.nn.Params4bit(w.data.reshape(e * out_f, in_f).to(compute_dtype).contiguous(),
                                  requires_grad=False, compress_statistics=double_quant, quant_type="nf4",
                                  quant_storage=quant_storage, blocksize=blocksize)
            params.append(p.to(device))
        return cls(*params, num_experts=weights[0].shape[0], act_fn=experts.act_fn, compute_dtype=compute_dtype)

    def expert_weight(self, name: str, expert: int):
        """Expert ``expert`` of weight ``name`` as a frozen ``kernels.base_weight.BaseWeight`` (out, in)."""
        p = getattr(self, name)
        w = NF4Weight.from_bnb(p.data, p.quant_state)
        return BaseWeight(nf4=expert_slice(w, expert, self.num_experts),
                          backend=resolve_backend(self.backend, p.device))

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Weight ``name`` dequantized whole, (E, out, in) (merge and tests only)."""
        return torch.stack([self.expert_weight(name, e).weight(dtype or self.compute_dtype)
                            for e in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H)."""
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        e2i, h = self.gate_up_proj.quant_state.shape
        return f"num_experts={self.num_experts}, hidden={h}, intermediate={e2i // self.num_experts // 2}, nf4"


def expert_weight(experts: nn.Module, name: str, expert: int):
    """Expert ``expert`` of weight ``name`` (``gate_up_proj`` | ``down_proj``) of a fused experts
    module (16-bit or NF4) as a frozen ``BaseWeight`` (out, in)."""
    if isinstance(experts, NF4Experts):
        return experts.expert_weight(name, expert)
    return BaseWeight(dense=getattr(experts, name)[expert].detach(), backend="torch")


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, adapter: Callable | None = None) -> torch.Tensor:
    """The routed experts' sum (T, H) for hidden_states (T, H), expert by expert (see the module
    docstring). ``adapter(name, e)``: None, or (A_e (r, in), B_e (out, r), scale) of a LoRA on
    expert e's weight ``name``; the matmuls run through ``kernels.lora_linear`` (frozen W
    recomputed in the backward, never saved)."""
    num_experts = _num_experts(experts)
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)  # (E, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]  # (n_e, H)
        h = _matmul(x, expert_weight(experts, "gate_up_proj", e), adapter, "gate_up_proj", e)
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up  # (n_e, I)
        y = _matmul(h, expert_weight(experts, "down_proj", e), adapter, "down_proj", e)
        y = y * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _num_experts(experts: nn.Module) -> int:
    return int(getattr(experts, "num_experts", None) or getattr(experts, "gate_up_proj").shape[0])


def _matmul(x: torch.Tensor, bw: BaseWeight, adapter: Callable | None, name: str, e: int) -> torch.Tensor:
    """x (n, in) @ W_e^T (n, out), plus expert e's LoRA on weight ``name`` when ``adapter`` has one."""
    lora = adapter(name, e) if adapter is not None else None
    if lora is None:
        return frozen_linear(x, bw)
    a, b, scale = lora
    return lora_linear(x, bw, a, b, scale)


def quantize_experts(model: nn.Module, *, compute_dtype: torch.dtype, double_quant: bool = True,
                     blocksize: int = 64, quant_storage: torch.dtype = torch.uint8,
                     device: torch.device | str | None = None) -> int:
    """Replace every 16-bit fused experts module of ``model`` by :class:`NF4Experts`, in place, one at
    a time (each module's 16-bit weights are freed before the next is quantized); returns how many.
    An experts module whose expert size is not whole blocks stays 16-bit (logged)."""
    other = other_experts_modules(model)
    if other:
        log.warning("%d experts modules (%s) are in a layout we do not run (e.g. transposed, with biases): "
                    "kept in 16 bits and not adapted by LoRA", len(other),
                    ", ".join(sorted({type(m).__name__ for m in other.values()})))
    n = 0
    for name, module in experts_modules(model).items():
        if isinstance(module, NF4Experts):
            continue
        new = NF4Experts.from_module(module, compute_dtype=compute_dtype, double_quant=double_quant,
                                     blocksize=blocksize, quant_storage=quant_storage, device=device)
        if new is None:
            log.warning("%s: expert size is not a whole number of %d-element blocks; kept in 16 bits",
                        name, blocksize)
            continue
        new.train(module.training)
        model.set_submodule(name, new)
        n += 1
    if n:
        log.info("quantized %d fused experts modules to NF4 (double quant %s)", n, double_quant)
    return n
