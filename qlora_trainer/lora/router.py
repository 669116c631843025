"""LoRA on the mixture-of-experts router (``lora.target_router``), stored as PEFT's
``target_parameters`` stores a 2-D parameter.

In transformers 5 the router of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, ... is the sibling of the
fused experts module (``<block>.gate``, a ``*TopKRouter``): one parameter ``weight`` W (E, H) used as
``logits = x @ W^T`` (T, E), then softmax and top-k give the experts' indices and routing weights.
:class:`LoRARouter` wraps it (kept as ``base_layer``, 16-bit: bitsandbytes and our NF4 path quantize
neither it nor it here) and runs the router's own forward with its weight replaced by

    W' = W + s * B @ A        A (r, H), B (E, r), s = alpha / r (alpha / sqrt(r) with rsLoRA)

which is what PEFT's ``ParamWrapper`` does for a 2-D parameter (a parametrization of ``weight``), so
whatever the router computes from its weight, ours and PEFT's agree. W' is (E, H), small next to any
projection (E = 8..128 experts). Gradients reach A and B through the routing weights (softmax of the
logits, top-k, renormalised); the top-k selection itself has none.

On disk: ``<router>.lora_A.weight`` (r, H) and ``<router>.lora_B.weight`` (E, r), and
``"<block>.gate.weight"`` in the config's ``target_parameters``. PEFT's ``ParamWrapper`` refuses
dropout and DoRA: the router's adapter has neither.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.layer import AdapterSpec
from qlora_trainer.lora.modules import add_wrapped_adapters, wrapped
from qlora_trainer.models.moe import experts_modules

# the router's attribute on the MoE block, beside ``experts``: a ``*TopKRouter`` with one (E, H) weight
# (Mixtral, Qwen2/3-MoE, OLMoE). PhiMoE's and Granite-MoE's ``router`` (sparse mixer, biased/other
# layouts) are not adapted: PEFT's round trip and the gradient through them are not checked.
ROUTER_ATTRS = ("gate",)


def router_weight(module: nn.Module) -> nn.Parameter | None:
    """The router's 2-D weight (E, H), or None when ``module`` is not a router we adapt."""
    if isinstance(module, LoRARouter):
        module = module.base_layer
    w = module._parameters.get("weight")
    return w if isinstance(w, nn.Parameter) and w.dim() == 2 else None


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> router of every fused experts module (its block's ``gate``/``router`` with a
    2-D ``weight`` of E rows, E the experts' count); a wrapped one is listed as its wrapper."""
    out: dict[str, nn.Module] = {}
    for name, experts in experts_modules(model).items():
        block = name.rpartition(".")[0]
        num_experts = int(getattr(experts, "num_experts", 0) or experts.gate_up_proj.shape[0])
        for attr in ROUTER_ATTRS:
            qualified = f"{block}.{attr}" if block else attr
            try:
                module = model.get_submodule(qualified)
            except AttributeError:
                continue
            w = router_weight(module)
            if w is not None and w.shape[0] == num_experts:
                out[qualified] = module
                break
    return out


class LoRARouter(nn.Module):
    """A frozen 16-bit router (``base_layer``) whose weight gets a low-rank update: ``lora_A[adapter]``
    (r, H), ``lora_B[adapter]`` (E, r). Same forward contract as the router it wraps."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None

    @property
    def weight(self) -> nn.Parameter:
        """The base router's weight W (E, H), unadapted (as PEFT's ``ParamWrapper`` exposes it)."""
        return self.base_layer.weight

    def add_adapter(self, adapter_name: str, spec: AdapterSpec, *, dtype: torch.dtype) -> None:
        """A Kaiming-uniform (PEFT's default), B zero: the adapted router starts equal to the base."""
        e, h = self.weight.shape
        a = torch.empty(spec.r, h, device=self.weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_B[adapter_name] = nn.Parameter(torch.zeros(e, spec.r, device=self.weight.device, dtype=dtype))
        self.specs[adapter_name] = spec
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str | None) -> None:
        self.active_adapter = adapter_name if adapter_name in self.specs else None

    def delete_adapter(self, adapter_name: str) -> None:
        for d in (self.lora_A, self.lora_B):
            if adapter_name in d:
                del d[adapter_name]
        self.specs.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def delta(self, adapter_name: str) -> torch.Tensor:
        """s * B @ A (E, H), differentiable, in the adapter's dtype."""
        return (self.lora_B[adapter_name] @ self.lora_A[adapter_name]) * self.specs[adapter_name].scale

    def forward(self, *args, **kwargs):
        """The base router's forward with W' = W + s B A in place of W (module docstring)."""
        if self.active_adapter is None:
            return self.base_layer(*args, **kwargs)
        w = self.weight
        adapted = w + self.delta(self.active_adapter).to(w.dtype)
        return torch.func.functional_call(self.base_layer, {"weight": adapted}, args, kwargs)

    @torch.no_grad()
    def merged_module(self, adapter_name: str | None, dtype: torch.dtype) -> nn.Module:
        """The base router with ``adapter_name`` merged into its weight (computed in fp32), frozen."""
        w = self.weight.detach().float()
        if adapter_name is not None and adapter_name in self.specs:
            spec = self.specs[adapter_name]
            w = w + (self.lora_B[adapter_name].float() @ self.lora_A[adapter_name].float()) * spec.scale
        self.base_layer.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        return self.base_layer


def router_lora_layers(model: nn.Module) -> dict[str, LoRARouter]:
    """Qualified name -> :class:`LoRARouter`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRARouter)}


def inject_router_lora(model: nn.Module, spec: AdapterSpec, *, dtype: torch.dtype,
                       adapter_name: str = "default") -> list[str]:
    """Adapter ``adapter_name`` (rank/alpha of ``spec``; no dropout, no DoRA) on every MoE router;
    returns the adapted router names."""
    return add_wrapped_adapters(model, list(router_modules(model)), LoRARouter, adapter_name, spec.plain,
                                dtype=dtype)


def router_target(name: str) -> str:
    """PEFT ``target_parameters`` entry of router ``name``: its block's and its own name and
    ``weight`` (``mlp.gate.weight``), specific enough to select no other parameter."""
    return ".".join(name.split(".")[-2:] + ["weight"])


def router_state_dict(model: nn.Module, adapter_name: str, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of the router adapters (``prefix`` + ``<router>.lora_A.weight`` / ``.lora_B.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in router_lora_layers(model).items():
        if adapter_name in layer.specs:
            out[f"{prefix}{name}.lora_A.weight"] = layer.lora_A[adapter_name]
            out[f"{prefix}{name}.lora_B.weight"] = layer.lora_B[adapter_name]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def router_targets(model: nn.Module, adapter_name: str) -> list[str]:
    """The ``target_parameters`` entries of the router adapters named ``adapter_name``."""
    return sorted({router_target(n) for n, layer in router_lora_layers(model).items() if adapter_name in layer.specs})


def split_router_entries(model: nn.Module, layers: dict, config: dict) -> list[str]:
    """The adapter entries (module names) that are MoE routers targeted by ``target_parameters``."""
    targets = config.get("target_parameters") or []
    routers = router_modules(model)
    return [k for k in layers if k in routers and any(f"{k}.weight".endswith("." + t) or f"{k}.weight" == t
                                                      for t in targets)]


def attach_router_weights(model: nn.Module, names: list[str], layers: dict, config: dict, *, adapter_name: str,
                          dtype: torch.dtype, where: str) -> None:
    """Put the router entries ``names`` (:func:`split_router_entries`) of an adapter's ``layers``
    (``LayerWeights``: ``a`` (r, H), ``b`` (E, r)) on the model as ``adapter_name``."""
    for name in names:
        module = wrapped(model, name, LoRARouter)
        lw = layers[name]
        e, h = module.weight.shape
        r = lw.a.shape[0]
        if lw.a.shape != (r, h) or lw.b.shape != (e, r):
            raise QloraError(f"{where}: {name}: lora_A {tuple(lw.a.shape)} / lora_B {tuple(lw.b.shape)} do not fit "
                             f"a router of {e} experts over {h} features")
        spec = AdapterSpec(r=r, alpha=float(config.get("lora_alpha", 8)), use_rslora=bool(config.get("use_rslora", False)))
        module.add_adapter(adapter_name, spec, dtype=dtype)
        module.lora_A[adapter_name].data = lw.a.to(module.weight.device, dtype)
        module.lora_B[adapter_name].data = lw.b.to(module.weight.device, dtype)


def merge_routers(model: nn.Module, adapter_name: str | None, dtype: torch.dtype) -> int:
    """Replace every :class:`LoRARouter` by its base router with the adapter (``adapter_name``, default
    its active one) merged into the weight, under transformers' key; returns how many."""
    layers = router_lora_layers(model)
    for name, module in layers.items():
        use = adapter_name if adapter_name in module.specs else (None if adapter_name else module.active_adapter)
        model.set_submodule(name, module.merged_module(use, dtype))
    return len(layers)
