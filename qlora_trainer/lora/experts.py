"""LoRA on fused mixture-of-experts weights, stored as PEFT's ``target_parameters`` stores it.

:class:`LoRAExperts` replaces a fused experts module (16-bit, or ``models.moe.NF4Experts``) and keeps
it as ``base_layer``. For each adapted weight W (E, out, in) (``gate_up_proj``, ``down_proj``) and
adapter it holds PEFT ``ParamWrapper``'s two matrices, all experts' factors stacked:

    lora_A (r * E, in)     expert e's A_e = lora_A[e * r:(e + 1) * r]              (r, in)
    lora_B (out, r * E)    expert e's B_e = lora_B.view(out, r, E)[:, :, e]        (out, r)
    W'[e] = W[e] + s * B_e @ A_e                                                   (out, in)

(PEFT's ``get_delta_weight``: ``einsum("o r e, e r i -> e o i", B.view(out, r, E), A.view(E, r, in))``
for transformers' (E, out, in) layout.) Each expert's LoRA runs inside its matmul
(``models.moe.experts_forward``). On disk the wrappers nest in parameter registration order, the
first innermost: with both weights adapted, ``gate_up_proj``'s tensors are
``<experts>.base_layer.lora_A.weight`` / ``.lora_B.weight`` and ``down_proj``'s
``<experts>.lora_A.weight`` / ``.lora_B.weight``; the config lists
``target_parameters: ["experts.down_proj", "experts.gate_up_proj"]``.

PEFT reads this layout from the release whose ``ParamWrapper`` knows transformers' (E, out, in)
expert layout (it swaps in/out features for 3-D parameters); PEFT 0.18 takes 3-D parameters as
(E, in, out) and stores the factors the other way round. PEFT's ``ParamWrapper`` refuses dropout
and DoRA: expert adapters have neither (dropout stays on the linear layers' adapters).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_trainer.lora.layer import AdapterSpec
from qlora_trainer.lora.modules import add_wrapped_adapters, wrapped
from qlora_trainer.models.moe import EXPERT_PARAMS, NF4Experts, experts_forward, experts_modules
from qlora_trainer.errors import QloraError


class LoRAExperts(nn.Module):
    """A frozen fused experts module (``base_layer``) plus low-rank adapters on its expert weights.

    ``lora_A[weight][adapter]`` (r * E, in) and ``lora_B[weight][adapter]`` (out, r * E), PEFT's
    layout (module docstring). Same forward contract as the experts module it wraps."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict({n: nn.ParameterDict() for n in EXPERT_PARAMS})
        self.lora_B = nn.ModuleDict({n: nn.ParameterDict() for n in EXPERT_PARAMS})
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None

    @property
    def num_experts(self) -> int:
        base = self.base_layer
        return base.num_experts if isinstance(base, NF4Experts) else base.gate_up_proj.shape[0]

    def weight_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of one expert's weight ``name``."""
        base = self.base_layer
        if isinstance(base, NF4Experts):
            rows, in_f = getattr(base, name).quant_state.shape
            return rows // base.num_experts, in_f
        return tuple(getattr(base, name).shape[1:])  # type: ignore[return-value]

    def add_adapter(self, adapter_name: str, spec: AdapterSpec, *, dtype: torch.dtype,
                    weights: tuple[str, ...] = EXPERT_PARAMS) -> None:
        """Adapter ``adapter_name`` on ``weights``: A Kaiming-uniform (as ``nn.Linear``, PEFT's
        default), B zero, so the adapted model starts equal to the base."""
        device = next(self.base_layer.parameters()).device
        e = self.num_experts
        for name in weights:
            out_f, in_f = self.weight_shape(name)
            a = torch.empty(spec.r * e, in_f, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name][adapter_name] = nn.Parameter(a)
            self.lora_B[name][adapter_name] = nn.Parameter(torch.zeros(out_f, spec.r * e, device=device, dtype=dtype))
        self.specs[adapter_name] = spec
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str | None) -> None:
        self.active_adapter = adapter_name if adapter_name in self.specs else None

    def delete_adapter(self, adapter_name: str) -> None:
        for d in (*self.lora_A.values(), *self.lora_B.values()):
            if adapter_name in d:
                del d[adapter_name]
        self.specs.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def adapted(self, adapter_name: str) -> list[str]:
        """The expert weights adapter ``adapter_name`` adapts, in registration order."""
        return [n for n in EXPERT_PARAMS if adapter_name in self.lora_A[n]]

    def expert_factors(self, name: str, expert: int, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e (r, in), B_e (out, r)) of expert ``expert``: views of the stacked factors."""
        r, e = self.specs[adapter_name].r, self.num_experts
        a, b = self.lora_A[name][adapter_name], self.lora_B[name][adapter_name]
        return a[expert * r:(expert + 1) * r], b.view(b.shape[0], r, e)[:, :, expert]

    def delta(self, name: str, adapter_name: str) -> torch.Tensor:
        """s * B_e @ A_e for every expert, (E, out, in) in fp32."""
        spec, e = self.specs[adapter_name], self.num_experts
        a = self.lora_A[name][adapter_name].detach().float().view(e, spec.r, -1)  # (E, r, in)
        b = self.lora_B[name][adapter_name].detach().float()
        b = b.view(b.shape[0], spec.r, e).permute(2, 0, 1)  # (E, out, r)
        return torch.bmm(b, a) * spec.scale

    def _adapter(self, name: str, expert: int):
        active = self.active_adapter
        if active is None or active not in self.lora_A[name]:
            return None
        a, b = self.expert_factors(name, expert, active)
        return a, b, self.specs[active].scale

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H)."""
        return experts_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, adapter=self._adapter)

    def merged_module(self, adapter_name: str | None, dtype: torch.dtype) -> nn.Module:
        """The base experts module with ``adapter_name`` merged into 16-bit weights (E, out, in):
        the wrapped transformers module itself for a 16-bit base (weights replaced), else a
        transformers-layout stand-in built from the NF4 one (:class:`DenseExperts`)."""
        base = self.base_layer
        weights = {}
        for name in EXPERT_PARAMS:
            w = base.dense(name, torch.float32) if isinstance(base, NF4Experts) else getattr(base, name).detach().float()
            if adapter_name is not None and adapter_name in self.lora_A[name]:
                w = w + self.delta(name, adapter_name).to(w.device)
            weights[name] = nn.Parameter(w.to(dtype), requires_grad=False)
        if isinstance(base, NF4Experts):
            return DenseExperts(weights["gate_up_proj"], weights["down_proj"], base.act_fn)
        for name, w in weights.items():
            setattr(base, name, w)
        return base


class DenseExperts(nn.Module):
    """16-bit fused experts in transformers' layout (``gate_up_proj`` (E, 2I, H), ``down_proj``
    (E, H, I)), for a merged NF4 model: same parameter names, so ``save_pretrained`` writes the keys
    transformers loads."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.num_experts = gate_up_proj.shape[0]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def expert_lora_layers(model: nn.Module) -> dict[str, LoRAExperts]:
    """Qualified name -> :class:`LoRAExperts`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}


def inject_expert_lora(model: nn.Module, spec: AdapterSpec, *, dtype: torch.dtype,
                       adapter_name: str = "default") -> list[str]:
    """Adapter ``adapter_name`` (rank/alpha of ``spec``; no dropout, no DoRA) on every fused experts
    module's two weights; returns the adapted module names."""
    return add_wrapped_adapters(model, list(experts_modules(model)), LoRAExperts, adapter_name, spec.plain,
                                dtype=dtype)


def peft_prefixes(name: str, layer: LoRAExperts, adapter_name: str) -> dict[str, str]:
    """Weight -> PEFT key prefix (without ``base_model.model.``): the first adapted weight innermost."""
    weights = layer.adapted(adapter_name)
    return {w: name + ".base_layer" * (len(weights) - 1 - i) for i, w in enumerate(weights)}


def expert_state_dict(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of the expert adapters (``prefix`` + ``<experts>[.base_layer].lora_A.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in expert_lora_layers(model).items():
        for w, key in peft_prefixes(name, layer, adapter_name).items():
            out[f"{prefix}{key}.lora_A.weight"] = layer.lora_A[w][adapter_name]
            out[f"{prefix}{key}.lora_B.weight"] = layer.lora_B[w][adapter_name]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def is_expert_key(model: nn.Module, key: str, prefix: str) -> bool:
    """Whether PEFT key ``key`` (``prefix<experts>[.base_layer...].lora_A.weight``) is a tensor of a
    :class:`LoRAExperts` of ``model`` (its parameters are named otherwise: ``<experts>.lora_A.<weight>.<adapter>``)."""
    name = key.removeprefix(prefix).rpartition(".lora_")[0]
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    try:
        return isinstance(model.get_submodule(name), LoRAExperts)
    except AttributeError:
        return False


def target_parameters(model: nn.Module, adapter_name: str) -> list[str]:
    """PEFT's ``target_parameters`` for the expert adapters (sorted, as PEFT writes them)."""
    found = set()
    for name, layer in expert_lora_layers(model).items():
        short = name.rsplit(".", 1)[-1]
        found |= {f"{short}.{w}" for w in layer.adapted(adapter_name)}
    return sorted(found)


def merge_experts(model: nn.Module, adapter_name: str | None, dtype: torch.dtype) -> int:
    """Replace every :class:`LoRAExperts` (adapter ``adapter_name``, default its active one, merged)
    and every bare ``NF4Experts`` by 16-bit experts; returns how many."""
    n = 0
    for name, module in expert_lora_layers(model).items():
        use = adapter_name if adapter_name in module.specs else (None if adapter_name else module.active_adapter)
        model.set_submodule(name, module.merged_module(use, dtype))
        n += 1
    for name, module in list(model.named_modules()):  # after the wrappers are gone: bare NF4 experts
        if isinstance(module, NF4Experts):
            model.set_submodule(name, DenseExperts(*(nn.Parameter(module.dense(w, dtype), requires_grad=False)
                                                     for w in EXPERT_PARAMS), module.act_fn))
            n += 1
    return n


def _expert_entry(model: nn.Module, key: str, config: dict) -> tuple[str, str] | None:
    """(experts module name, weight name) for an adapter entry named ``key`` (``<experts>`` plus one
    ``.base_layer`` per nesting level), or None when ``key`` is not a fused experts module's."""
    name = key
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name.removesuffix(".base_layer"), depth + 1
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if not isinstance(module, LoRAExperts) and name not in experts_modules(model):
        return None
    short = name.rsplit(".", 1)[-1]
    targeted = [w for w in EXPERT_PARAMS
                if any(t == f"{short}.{w}" or t == w or f"{name}.{w}".endswith("." + t)
                       for t in config.get("target_parameters") or [])]
    if depth >= len(targeted):
        return None
    return name, targeted[len(targeted) - 1 - depth]


def split_expert_entries(model: nn.Module, layers: dict, config: dict) -> dict[str, tuple[str, str]]:
    """Adapter entry name -> (experts module, weight) for the entries that belong to fused experts."""
    if not config.get("target_parameters"):
        return {}
    found = {k: _expert_entry(model, k, config) for k in layers}
    return {k: v for k, v in found.items() if v is not None}


def attach_expert_weights(model: nn.Module, entries: dict[str, tuple[str, str]], layers: dict, config: dict, *,
                          adapter_name: str, dtype: torch.dtype, where: str) -> None:
    """Put the expert entries (``split_expert_entries``) of an adapter's ``layers`` (``LayerWeights``:
    ``a`` (r * E, in), ``b`` (out, r * E)) on the model as ``adapter_name``."""

    for key, (name, weight) in entries.items():
        layer = wrapped(model, name, LoRAExperts)
        lw, e = layers[key], layer.num_experts
        out_f, in_f = layer.weight_shape(weight)
        r = lw.a.shape[0] // e
        if lw.a.shape != (r * e, in_f) or lw.b.shape != (out_f, r * e):
            raise QloraError(f"{where}: {key} ({weight}): lora_A {tuple(lw.a.shape)} / lora_B {tuple(lw.b.shape)} "
                             f"do not fit {e} experts of ({out_f}, {in_f}); saved by a PEFT that stores 3-D "
                             f"expert weights as (E, in, out)?")
        spec = AdapterSpec(r=r, alpha=float(config.get("lora_alpha", 8)),
                           use_rslora=bool(config.get("use_rslora", False)))
        layer.add_adapter(adapter_name, spec, dtype=dtype, weights=(weight,))
        layer.lora_A[weight][adapter_name].data = lw.a.to(layer.lora_A[weight][adapter_name].device, dtype)
        layer.lora_B[weight][adapter_name].data = lw.b.to(layer.lora_B[weight][adapter_name].device, dtype)
