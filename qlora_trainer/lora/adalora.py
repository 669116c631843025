"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each adapted layer holds an SVD-form update with r0 = ``lora.r`` triplets::

    y = W x + s / r0 * B (E ⊙ A) x          A (r0, in), E (r0, 1) "singular values", B (out, r0)

(s = ``lora.alpha``; r0 stays the divisor when triplets are pruned, as in PEFT). Training adds the
orthogonality penalty ``w * mean_P ||P P^T - I||_F`` over P = A and P = B^T, and after every optimizer
step the ``RankAllocator`` scores each triplet i by its smoothed sensitivity::

    I(p) = |p * grad p|                                  per entry of A, E, B
    Ī ← β1 Ī + (1 - β1) I,   Ū ← β2 Ū + (1 - β2) |I - Ī|   score(p) = Ī Ū
    S_i = score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)

and zeroes the E_i of the lowest-scoring triplets across all layers so that the total kept rank
follows the cubic budget schedule: b(t) = b0 for t <= tinit, then
b_T + (b0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3 every ``delta_t`` steps, fixed at
b_T = target_r x layers from T - tfinal on (T = ``train.max_steps``). Masks, schedule and scores
follow PEFT's ``RankAllocator`` step for step, so PEFT is the test oracle. Saved in PEFT's AdaLoRA
format (``peft_type: ADALORA``, ``lora_A``/``lora_E``/``lora_B`` keys, ``rank_pattern``); loading one
gives a plain LoRA adapter A' = E ⊙ A with scale s / r0 (``peft_format.read_adapter``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlora_trainer.kernels import lora_matmul
from qlora_trainer.lora.base import base_weight_of, dequantized_weight
from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.lora.modules import linear_layers, match_targets, replace_module
from qlora_trainer.errors import ConfigError

if TYPE_CHECKING:
    from qlora_trainer.config import Config, LoRAConfig

log = logging.getLogger(__name__)
EPS = 1e-5  # PEFT's ranknum + 1e-5


class AdaLoRALinear(LoRALinear):
    """``LoRALinear`` plus AdaLoRA adapters (A, E, B); plain LoRA adapters on it work as before."""

    def __init__(self, base_layer: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(base_layer, backend=backend)
        self.lora_E = nn.ParameterDict()  # name -> (r0, 1)
        self.ranknum: dict[str, float] = {}  # name -> r0 (the divisor; never changes)
        self.rank_mask: dict[str, list[bool]] = {}  # name -> kept triplets, after the final allocation

    def add_adalora(self, name: str, *, r: int, alpha: float, dropout: float, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> None:
        """A, B ~ N(0, 0.02²), E = 0 (the update starts at zero), as PEFT; make it active."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        dev = self._device()
        a = torch.empty(r, self.in_features, device=dev).normal_(0.0, 0.02, generator=generator)
        b = torch.empty(self.out_features, r, device=dev).normal_(0.0, 0.02, generator=generator)
        self.lora_A[name] = nn.Parameter(a.to(dtype))
        self.lora_B[name] = nn.Parameter(b.to(dtype))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=dev, dtype=dtype))
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.specs[name] = AdapterSpec(r=r, alpha=alpha, dropout=dropout)
        self.ranknum[name] = float(r)
        self.active_adapter = name

    def ada_scale(self, name: str) -> float:
        """alpha / (r0 + 1e-5) (alpha <= 0 means r0, as PEFT)."""
        alpha = self.specs[name].alpha
        return (alpha if alpha > 0 else self.ranknum[name]) / (self.ranknum[name] + EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        name = self.active_adapter
        if self.merged_layer is not None or name not in self.ranknum:
            return super().forward(x)
        a = self.lora_A[name] * self.lora_E[name]  # (r0, in): pruned triplets are zero rows
        p = self.specs[name].dropout if self.training else 0.0
        return lora_matmul(x, self.base_layer, a, self.lora_B[name], self.ada_scale(name), dropout=p,
                           backend=self.backend)

    def grouping_operands(self):
        """(BaseWeight, E ⊙ A, B, alpha / r0) for a grouped q/k/v or gate/up matmul
        (``kernels.grouped_linear``), or None when this layer must run alone; plain adapters as LoRALinear."""
        name = self.active_adapter
        if name not in self.ranknum:
            return super().grouping_operands()
        if self.merged_layer is not None or (self.training and self.specs[name].dropout > 0):
            return None
        bw = base_weight_of(self.base_layer, self.backend)
        if bw is None:
            return None
        return bw, self.lora_A[name] * self.lora_E[name], self.lora_B[name], self.ada_scale(name)

    @torch.no_grad()
    def merged_weight(self, name: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        name = self.active_adapter if name is None else name
        if name not in self.ranknum:
            return super().merged_weight(name, dtype)
        w = dequantized_weight(self.base_layer, self.backend).float()
        a = self.lora_A[name].float() * self.lora_E[name].float()
        return (w + self.ada_scale(name) * (self.lora_B[name].float() @ a)).to(dtype)

    def delete_adapter(self, name: str) -> None:
        if name in self.lora_E:
            del self.lora_E[name]
        self.ranknum.pop(name, None)
        self.rank_mask.pop(name, None)
        super().delete_adapter(name)


def ada_layers(model: nn.Module, name: str = "default") -> dict[str, AdaLoRALinear]:
    """Qualified name -> layer, for every layer holding AdaLoRA adapter ``name`` (module order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear) and name in m.ranknum}


def inject_adalora(model: nn.Module, cfg: "LoRAConfig", *, dtype: torch.dtype, backend: str = "auto",
                   adapter_name: str = "default") -> list[str]:
    """Put an AdaLoRA adapter (r0 = ``cfg.r``) on every targeted linear layer; everything else frozen."""
    names = match_targets(model, cfg.targets)
    if not names:
        some = ", ".join(list(linear_layers(model))[:6])
        raise ConfigError(f"lora.targets: {cfg.targets!r} matches no linear layer (some names: {some})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ConfigError(f"lora.variant: adalora: {name} already has adapters; start from the bare base")
        module = AdaLoRALinear(module, backend=backend)
        replace_module(model, name, module)
        module.add_adalora(adapter_name, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, dtype=dtype)
        for d in (module.lora_A, module.lora_B, module.lora_E):
            d[adapter_name].requires_grad_(True)
    log.info("AdaLoRA %s on %d layers: initial rank %d, target average rank %d", adapter_name, len(names),
             cfg.r, cfg.adalora.target_r)
    return names


def orthogonal_loss(model: nn.Module, name: str = "default") -> torch.Tensor:
    """mean over P in {A, B^T} of every layer of ||P P^T - I||_F (a scalar that carries grad)."""
    terms = []
    for layer in ada_layers(model, name).values():
        for p in (layer.lora_A[name], layer.lora_B[name].t()):
            cov = p @ p.t()  # (r0, r0)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


class RankAllocator:
    """AdaLoRA's budget schedule and triplet pruning for adapter ``name`` (see the module docstring).

    Call :meth:`step` after each ``optimizer.step()`` and before ``zero_grad`` with the 0-based
    step index. ``ranks()`` is the current rank per layer."""

    def __init__(self, model: nn.Module, *, target_r: int, total_step: int, tinit: int = 0, tfinal: int = 0,
                 delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85, name: str = "default") -> None:
        self.model, self.name = model, name
        self.total_step, self.tinit, self.tfinal, self.delta_t = total_step, tinit, tfinal, delta_t
        self.beta1, self.beta2 = beta1, beta2
        layers = ada_layers(model, name)
        self.init_budget = sum(layer.lora_E[name].shape[0] for layer in layers.values())
        self.target_budget = target_r * len(layers)
        self.budget = self.init_budget
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_scores()

    def reset_scores(self) -> None:
        self.ema_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.ema_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _params(self) -> dict[tuple[str, str], nn.Parameter]:
        return {(n, k): getattr(layer, f"lora_{k}")[self.name]
                for n, layer in ada_layers(self.model, self.name).items() for k in ("A", "B", "E")}

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to prune now) at ``step`` - PEFT's cubic schedule."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        frac = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * frac ** 3 + self.target_budget)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def _update_scores(self) -> None:
        for key, p in self._params().items():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.ema_ipt.get(key, torch.zeros_like(p))
            unc = self.ema_unc.get(key, torch.zeros_like(p))
            avg = self.beta1 * avg + (1 - self.beta1) * ipt
            self.ema_ipt[key] = avg
            self.ema_unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def _score(self, key: tuple[str, str]) -> torch.Tensor:
        if key not in self.ema_ipt:  # no averages yet (a run resumed right before pruning): rank by |E|
            p = self._params()[key]
            return p.detach().abs() if key[1] == "E" else torch.zeros_like(p)
        return self.ema_ipt[key] * self.ema_unc[key]

    @torch.no_grad()
    def _mask_to(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E of the lowest-scoring triplets so that ``budget`` remain (ties at the threshold go)."""
        layers = ada_layers(self.model, self.name)
        scores = {n: self._score((n, "E")).view(-1) + self._score((n, "A")).mean(dim=1)
                  + self._score((n, "B")).mean(dim=0) for n in layers}
        k = self.init_budget - budget
        if k <= 0:
            return {n: [True] * s.numel() for n, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k).values.item()
        pattern = {}
        for n, layer in layers.items():
            drop = scores[n] <= threshold
            layer.lora_E[self.name].masked_fill_(drop.view(-1, 1), 0.0)
            pattern[n] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def step(self, step: int) -> dict[str, list[bool]] | None:
        """Update scores and prune for ``step``; returns the new rank pattern when it pruned."""
        final = self.total_step - self.tfinal
        if step < final:
            self._update_scores()
            self.budget, prune = self.budget_at(step)
            if prune:
                self.rank_pattern = self._mask_to(self.budget)
                return self.rank_pattern
        elif step == final:
            self.budget, _ = self.budget_at(step)
            self.rank_pattern = self._mask_to(self.budget)
            for n, layer in ada_layers(self.model, self.name).items():
                layer.rank_mask[self.name] = self.rank_pattern[n]
            self.reset_scores()
            log.info("AdaLoRA final rank allocation (budget %d): %s", self.budget, self.ranks())
            return self.rank_pattern
        elif self.rank_pattern is not None:  # keep pruned triplets at zero during the final phase
            for n, layer in ada_layers(self.model, self.name).items():
                keep = torch.tensor(self.rank_pattern[n], device=layer.lora_E[self.name].device)
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
        return None

    def resume(self, step: int) -> None:
        """After resuming at ``step`` (steps done): past the final allocation the kept triplets are
        the nonzero E's (pruned ones are exactly 0). The importance averages are not checkpointed:
        they start afresh (until they have values, pruning ranks triplets by |E|)."""
        if step > self.total_step - self.tfinal:
            layers = ada_layers(self.model, self.name)
            self.rank_pattern = {n: (layer.lora_E[self.name] != 0).view(-1).tolist() for n, layer in layers.items()}
            for n, layer in layers.items():
                layer.rank_mask[self.name] = self.rank_pattern[n]
            self.budget = self.target_budget

    def final(self, step: int) -> bool:
        """Whether ``step`` is the one that fixes the ranks (T - tfinal)."""
        return step == self.total_step - self.tfinal

    def orthogonality_backward(self, weight: float) -> None:
        """Add weight * :func:`orthogonal_loss` to the grads (once per optimizer step)."""
        if weight > 0:
            (weight * orthogonal_loss(self.model, self.name)).backward()

    def ranks(self) -> dict[str, int]:
        """Layer -> kept triplets (all of them before the first pruning)."""
        layers = ada_layers(self.model, self.name)
        if self.rank_pattern is None:
            return {n: layer.lora_E[self.name].shape[0] for n, layer in layers.items()}
        return {n: sum(self.rank_pattern[n]) for n in layers}


def allocator_for(model: nn.Module, cfg: "Config") -> RankAllocator | None:
    """The run's ``RankAllocator`` (``lora.variant: adalora``), else None."""
    if cfg.lora.variant != "adalora":
        return None
    lc = cfg.lora
    return RankAllocator(model, target_r=lc.adalora.target_r, total_step=cfg.train.max_steps, tinit=lc.adalora.tinit,
                         tfinal=lc.adalora.tfinal, delta_t=lc.adalora.delta_t, beta1=lc.adalora.beta1,
                         beta2=lc.adalora.beta2)
