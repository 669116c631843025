"""An adapter's tensors apart from any model: what ``combine`` works on and ``hotswap`` swaps in.

``AdapterWeights.layers`` maps a module path (``model.layers.0.self_attn.q_proj``) to that layer's
``LayerWeights``: A (r, in), B (out, r), the scale s (alpha / r, or alpha / sqrt(r) with rsLoRA) and,
for DoRA, the magnitude m (out,). The layer computes ``W x + s B A x`` (DoRA: see ``dora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class LayerWeights:
    """One layer's adapter: ``a`` (r, in), ``b`` (out, r), scale ``scale``, DoRA magnitude (out,) or None."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """s B A (out, in) in fp32 (the dense update of plain LoRA)."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class AdapterWeights:
    """A whole adapter: per-layer weights plus the ``adapter_config.json`` it came with (or will get)."""

    layers: dict[str, LayerWeights]
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the directory it was read from, if any
    token_rows: dict[str, Any] = field(default_factory=dict)  # PEFT-keyed rows of added tokens (lora/tokens.py)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "adapter"

    def ranks(self) -> dict[str, int]:
        return {n: w.r for n, w in self.layers.items()}
