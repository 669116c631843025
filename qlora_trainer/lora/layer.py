"""``LoRALinear``: a frozen linear layer (``nn.Linear`` or bitsandbytes NF4 ``Linear4bit``) plus
one or more low-rank adapters, installed by module replacement (see ``inject.py``).

For the active adapter with rank r, A (r, in), B (out, r) and scale s::

    lora:   y = base(x) + s * B A drop(x)          s = alpha / r   (rsLoRA: alpha / sqrt(r))
    dora:   see ``dora.py`` (magnitude m (out,) times the row-normalised W + s B A)

The low-rank matmul goes through ``qlora_trainer.kernels.lora_matmul`` (the one dispatch point),
which also applies LoRA's dropout (on the Triton path from a seeded mask regenerated in the
backward, so dropout saves no activation); DoRA applies its ``lora_dropout`` module itself. The
``lora_dropout`` modules stay for every adapter (PEFT's module layout).
Several adapters can live on one base; exactly one (or none) is active at a time, so switching is
free and the base is never reloaded. Parameter names follow PEFT's
(``<module>.lora_A.<adapter>``, ``<module>.lora_B.<adapter>``, ``<module>.lora_magnitude_vector.<adapter>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qlora_trainer.kernels import lora_matmul
from qlora_trainer.lora.base import base_compute_dtype, base_weight_of, dequantized_weight, frozen_linear
from qlora_trainer.lora.dora import dora_forward, weight_norm
from qlora_trainer.models.nf4_linear import claim_4bit_layers
from qlora_trainer.models.quantize import is_4bit

__all__ = ["VARIANTS", "INITS", "AdapterSpec", "LoRALinear", "dequantized_weight", "frozen_linear",
           "base_compute_dtype"]

VARIANTS = ("lora", "rslora", "dora")
INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter on one layer (the tensors live in the module).

    ``use_rslora`` and ``use_dora`` are independent, as in PEFT's ``LoraConfig``.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    @classmethod
    def from_variant(cls, variant: str, *, r: int, alpha: float, dropout: float = 0.0) -> "AdapterSpec":
        """``lora`` | ``rslora`` | ``dora`` (the ``lora.variant`` config field)."""
        if variant not in VARIANTS:
            raise ValueError(f"lora variant {variant!r} is not one of {', '.join(VARIANTS)}")
        return cls(r=r, alpha=alpha, dropout=dropout, use_rslora=variant == "rslora", use_dora=variant == "dora")

    @property
    def plain(self) -> "AdapterSpec":
        """The same rank, alpha and rsLoRA without dropout or DoRA (what PEFT's ``ParamWrapper``, the
        adapter on MoE experts and routers, allows)."""
        return AdapterSpec(r=self.r, alpha=self.alpha, use_rslora=self.use_rslora)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (keeps the update's scale rank-independent)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def variant(self) -> str:
        return "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` plus named low-rank adapters; forward uses the active one.

    Args:
        base_layer: ``nn.Linear`` or ``bnb.nn.Linear4bit``; frozen here.
        backend: ``auto|triton|torch`` for :func:`qlora_trainer.kernels.lora_matmul`.
    """

    def __init__(self, base_layer: nn.Module, *, backend: str = "auto") -> None:
        super().__init__()

        if is_4bit(base_layer):  # our NF4 compute, no bitsandbytes CPU repacking (nf4_linear.py)

            claim_4bit_layers(base_layer, backend=backend)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.backend = backend
        # adapter term before the base matmul, so a checkpoint recompute's early stop skips the base
        # GEMM (set on a layer's last projection by models/checkpointing.py; see kernels.lora_linear)
        self.recompute_skips_base = False
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> (out,), DoRA only
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.merged_layer: nn.Linear | None = None  # dense W' while an adapter is merged (see merge)
        self._norm_cache: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}  # DoRA, eval mode only
        self.train(base_layer.training)  # a layer swapped into an eval() model stays in eval mode

    # -- adapters ---------------------------------------------------------------------------------

    def add_adapter(self, name: str, spec: AdapterSpec, *, dtype: torch.dtype, init: str = "kaiming",
                    generator: torch.Generator | None = None) -> None:
        """Create adapter ``name`` (A as PEFT: Kaiming-uniform a=sqrt(5), or N(0, 1/r); B = 0) and
        make it active. DoRA's magnitude starts at the row norms of W, so the layer's output at init
        is exactly the base's."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if init not in INITS:
            raise ValueError(f"lora init {init!r} is not supported (supported: {', '.join(INITS)})")
        device = self._device()
        a = torch.empty(spec.r, self.in_features, device=device, dtype=torch.float32)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a, std=1.0 / spec.r, generator=generator)
        self.lora_A[name] = nn.Parameter(a.to(dtype))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, spec.r, device=device, dtype=dtype))
        if spec.use_dora:
            w = dequantized_weight(self.base_layer, self.backend)
            m = weight_norm(w, self.lora_A[name], self.lora_B[name], spec.scale)
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(dtype))
        self.lora_dropout[name] = (nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()).train(self.training)
        self.specs[name] = spec
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s tensors; if it was active the layer runs its base alone."""
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_dropout):
            if name in d:
                del d[name]
        self._norm_cache.pop(name, None)
        self.specs.pop(name)
        if self.active_adapter == name:
            self.active_adapter = None
            self.merged_layer = None

    def set_adapter(self, name: str | None) -> None:
        """Activate adapter ``name``; ``None`` runs the base layer alone. Unmerges first."""
        if name is not None and name not in self.specs:
            raise KeyError(f"no adapter {name!r} (have: {', '.join(self.specs) or 'none'})")
        self.merged_layer = None
        self.active_adapter = name

    def _device(self) -> torch.device:
        return self.base_layer.weight.device

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.merged_layer is not None:
            return self.merged_layer(x)
        name = self.active_adapter
        if name is None:
            return self.base_layer(x)
        spec = self.specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        if spec.use_dora:
            drop = self.lora_dropout[name]
            x_lora = drop(x) if self.training and not isinstance(drop, nn.Identity) else None
            return dora_forward(x, x_lora, self.base_layer, a, b, self.lora_magnitude_vector[name],
                                spec.scale, backend=self.backend, norm=self._eval_norm(name))
        p = spec.dropout if self.training else 0.0  # applied inside lora_matmul (mask not saved)
        return lora_matmul(x, self.base_layer, a, b, spec.scale, dropout=p, backend=self.backend,
                           recompute_skips_base=self.recompute_skips_base)

    def grouping_operands(self):
        """(BaseWeight, A, B, scale) of the active adapter when this layer's forward can join a grouped
        matmul (``kernels.grouped_linear``: q/k/v, gate/up): a plain LoRA/rsLoRA adapter, not merged,
        no active dropout, a base our kernels read. None otherwise (the layer then runs alone)."""
        name = self.active_adapter
        if self.merged_layer is not None or name is None:
            return None
        spec = self.specs[name]
        if spec.use_dora or (self.training and spec.dropout > 0):
            return None
        bw = base_weight_of(self.base_layer, self.backend)
        if bw is None:
            return None
        return bw, self.lora_A[name], self.lora_B[name], spec.scale

    def _eval_norm(self, name: str) -> torch.Tensor | None:
        """DoRA's ||W + s B A||_row, cached in eval mode (generation would otherwise dequantize W for
        every token). The key holds A's and B's version counters, so in-place edits invalidate it."""
        if self.training:
            self._norm_cache.pop(name, None)
            return None
        a, b = self.lora_A[name], self.lora_B[name]
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version)
        hit = self._norm_cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, weight_norm(dequantized_weight(self.base_layer, self.backend), a, b, self.specs[name].scale))
            self._norm_cache[name] = hit
        return hit[1]

    # -- dense weights (merge) --------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self, name: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight equal to this layer with adapter ``name`` (default: active):
        W + s B A, or for DoRA m / ||W + s B A||_row * (W + s B A). Computed in fp32, cast to ``dtype``."""
        name = self.active_adapter if name is None else name
        bw = base_weight_of(self.base_layer, self.backend)
        if name is None:
            return dequantized_weight(self.base_layer, self.backend).to(dtype)
        spec = self.specs[name]
        a, b = self.lora_A[name], self.lora_B[name]
        if bw is not None:
            w = bw.merged(b, a, spec.scale)
        else:
            w = dequantized_weight(self.base_layer, self.backend).float()
            w = torch.addmm(w, b.detach().float(), a.detach().float(), alpha=spec.scale)
        if spec.use_dora:
            norm = torch.linalg.vector_norm(w, dim=1)
            w = w * (self.lora_magnitude_vector[name].float() / norm)[:, None]
        return w.to(dtype)

    def dense_linear(self, name: str | None = None, dtype: torch.dtype | None = None) -> nn.Linear:
        """A frozen ``nn.Linear`` computing this layer with adapter ``name`` (default: active) merged.
        ``dtype`` defaults to the base's compute dtype."""
        dtype = dtype or base_compute_dtype(self.base_layer)
        return frozen_linear(self.base_layer, self.merged_weight(name, dtype=dtype), dtype)

    def merge(self, name: str | None = None) -> None:
        """Run adapter ``name`` merged: forward becomes one dense matmul with W'. The base module is
        kept, so :meth:`unmerge` is exact (costs one dense (out, in) weight while merged)."""
        name = self.active_adapter if name is None else name
        self.set_adapter(name)
        self.merged_layer = self.dense_linear(name)

    def unmerge(self) -> None:
        self.merged_layer = None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r}, {s.variant})" for n, s in self.specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}], active={self.active_adapter}"
