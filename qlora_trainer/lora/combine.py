"""Combine trained LoRA adapters into one ("LoRA merging"), with PEFT's ``add_weighted_adapter`` methods.

Every input layer i holds A_i (r_i, in), B_i (out, r_i) and a scale s_i, i.e. the update
Δ_i = s_i B_i A_i; w_i is its user weight. The result is a plain LoRA adapter with scale 1
(``lora_alpha = r``), so its update is B A:

``cat``            A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: B A = Σ w_i Δ_i exactly;
                   rank Σ r_i.
``linear``         A = Σ c_i A_i, B = Σ |c_i| B_i with |c_i| = sqrt(|w_i s_i|), sign(c_i) = sign(w_i s_i):
                   an approximation (cross terms A_i B_j survive); needs equal ranks.
``ties``           TIES-merging (Yadav et al. 2023) of the A's and of the B's with those c_i: keep the
                   top ``density`` fraction of each tensor by |value|, elect each entry's sign (sign of
                   the sum of the pruned values; ``frequency``: the more common sign), and average the
                   weighted entries that agree with it.
``dare_linear``    DARE (Yu et al. 2023): keep each entry with probability ``density``, rescale by
                   1 / density, then sum as ``linear``.
``dare_ties``      DARE's random pruning, then TIES' sign election and disjoint mean.
``magnitude_prune`` ``ties``' pruning with ``linear``'s sum.
``svd``            truncated SVD of Σ w_i Δ_i: B = U_k S_k, A = V_k^T, k = ``svd_rank`` (default max r_i).
``<m>_svd``        method m applied to the dense Δ_i (weights w_i), then the truncated SVD.

The non-SVD, non-cat methods combine factor by factor, so every adapter on a layer must have the
same rank there; ``cat`` sums ranks; the SVD methods pick their rank. DoRA adapters are refused
(combining magnitudes is undefined; PEFT does not either). With one adapter every method is
``linear`` (as PEFT). Random pruning draws from ``generator`` with ``torch.bernoulli``, layer by
layer in ``order`` (A's, then B's, adapter by adapter), so a run is reproducible from its seed and,
given PEFT's module order and generator state, uses exactly PEFT's draws.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.weights import AdapterWeights, LayerWeights

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
# method (without _svd) -> (pruning, merge): pruning none|magnitude|random, merge sum|disjoint
_RECIPES = {"linear": ("none", "sum"), "svd": ("none", "sum"), "magnitude_prune": ("magnitude", "sum"),
            "ties": ("magnitude", "disjoint"), "dare_linear": ("random", "sum"), "dare_ties": ("random", "disjoint")}
SIGN_METHODS = ("total", "frequency")


def needs_density(method: str) -> bool:
    return _RECIPES.get(method.removesuffix("_svd"), ("none",))[0] != "none"


# -- the merge primitives (on a list of same-shaped task tensors) ---------------------------------

def _prune(t: torch.Tensor, density: float, how: str, generator: torch.Generator | None) -> torch.Tensor:
    """Keep the ``density`` fraction of ``t``: its largest |entries| (magnitude) or a random subset
    rescaled by 1 / density (DARE). density >= 1 keeps everything and draws nothing."""
    if how == "none" or density >= 1:
        return t
    if how == "magnitude":
        keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
        return t * keep.reshape(t.shape)
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], method: str, *, density: float = 1.0,
                  majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ_i w_i t_i after the method's pruning (``sum``), or TIES' disjoint mean (``disjoint``): per
    entry, the mean of the weighted values whose sign agrees with the elected sign of the pruned
    values (ties go to +)."""
    pruning, merge = _RECIPES[method.removesuffix("_svd")]
    stacked = torch.stack([_prune(t, density, pruning, generator) for t in tensors])  # (n, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.ndim - 1))
    weighted = stacked * w
    if merge == "sum":
        return weighted.sum(dim=0)
    sign = stacked.sign()
    elected = (stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)) >= 0
    agree = sign == torch.where(elected, 1.0, -1.0).to(sign.dtype)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


# -- one layer ------------------------------------------------------------------------------------

def _combine_layer(parts: list[tuple[LayerWeights, float]], method: str, *, rank: int, density: float,
                   majority_sign: str, svd_clamp: float | None,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r', in), B (out, r') of one layer with update B A (scale 1)."""
    if method == "cat":
        a = torch.cat([lw.a.float() * w * lw.scale for lw, w in parts], dim=0)
        return a, torch.cat([lw.b.float() for lw, _ in parts], dim=1)
    if method in FACTOR_METHODS:
        ws = [w * lw.scale for lw, w in parts]
        wa = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws]  # the sign goes on A only
        wb = [math.sqrt(abs(x)) for x in ws]
        kw = dict(density=density, majority_sign=majority_sign, generator=generator)
        a = merge_tensors([lw.a.float() for lw, _ in parts], wa, method, **kw)
        return a, merge_tensors([lw.b.float() for lw, _ in parts], wb, method, **kw)
    delta = merge_tensors([lw.delta() for lw, _ in parts], [w for _, w in parts], method, density=density,
                          majority_sign=majority_sign, generator=generator)  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if svd_clamp is not None:  # clip outliers at the |value| quantile of both factors together
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        a, b = a.clamp(-hi, hi), b.clamp(-hi, hi)
    return a, b


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check(adapters: list[AdapterWeights], weights: Sequence[float], method: str, density: float | None,
           majority_sign: str, svd_rank: int | None, svd_clamp: float | None) -> None:
    if method not in METHODS:
        raise QloraError(f"combine: --method {method!r} is not one of {', '.join(METHODS)}")
    if not adapters:
        raise QloraError("combine: give at least one adapter")
    if len(weights) != len(adapters):
        raise QloraError(f"combine: {len(adapters)} adapters but {len(weights)} weights; give one --weights value each")
    for ad in adapters:
        if ad.config.get("target_parameters"):
            raise QloraError(f"combine: {ad.name} adapts fused MoE experts (target_parameters); combining them is "
                             f"not supported (merge it into the base with `qlora-trainer merge` instead)")
        if ad.use_dora:
            raise QloraError(f"combine: {ad.name} is a DoRA adapter; combining DoRA magnitudes is not defined "
                             "(merge it into the base with `qlora-trainer merge` instead)")
    if needs_density(method) and (density is None or not 0 < density <= 1):
        raise QloraError(f"combine: --method {method} needs --density in (0, 1], the fraction of entries kept "
                         f"(got {density})")
    if majority_sign not in SIGN_METHODS:
        raise QloraError(f"combine: majority sign method {majority_sign!r} is not one of {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and svd_rank < 1:
        raise QloraError(f"combine: --svd-rank must be >= 1 (got {svd_rank})")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise QloraError(f"combine: --svd-clamp is a quantile in (0, 1] (got {svd_clamp})")


def _check_layer(name: str, parts: list[tuple[AdapterWeights, LayerWeights]], method: str,
                 svd_rank: int | None) -> None:
    shapes = {(lw.b.shape[0], lw.a.shape[1]) for _, lw in parts}
    if len(shapes) > 1:
        have = ", ".join(f"{ad.name}: (out, in) = {(lw.b.shape[0], lw.a.shape[1])}" for ad, lw in parts)
        raise QloraError(f"combine: {name} has different shapes in the adapters ({have}); were they trained "
                         "on the same base?")
    ranks = [lw.r for _, lw in parts]
    if method in FACTOR_METHODS and len(set(ranks)) > 1:
        have = ", ".join(f"{ad.name} r={lw.r}" for ad, lw in parts)
        raise QloraError(f"combine: --method {method} combines A's and B's entry by entry, so the ranks must be "
                         f"equal on every layer, but {name} has {have}; use --method cat (rank {sum(ranks)}) "
                         f"or svd (rank --svd-rank, default {max(ranks)})")
    out_f, in_f = shapes.pop()
    if method.endswith("svd") and svd_rank is not None and svd_rank > min(out_f, in_f):
        raise QloraError(f"combine: --svd-rank {svd_rank} exceeds {name}'s min(out, in) = {min(out_f, in_f)}")


def combine_adapters(adapters: list[AdapterWeights], weights: Sequence[float], method: str, *,
                     density: float | None = None, majority_sign: str = "total", svd_rank: int | None = None,
                     svd_clamp: float | None = None, generator: torch.Generator | None = None,
                     order: Sequence[str] | None = None) -> AdapterWeights:
    """One plain-LoRA adapter (scale 1 on every layer) out of ``adapters``, weighted by ``weights``.

    A layer is combined from the adapters that have it. ``order`` is the layer order for the random
    draws (default: module paths in natural order, ``layers.2`` before ``layers.10``); layers not in
    it come after. The result holds fp32 factors cast to the first adapter's dtype and a PEFT
    ``adapter_config.json`` (``rank_pattern``/``alpha_pattern`` when ranks differ across layers).
    Raises QloraError, explained, for unequal ranks where the method needs equal ones, DoRA inputs,
    a missing or out-of-range density, and mismatched shapes.
    """
    _check(adapters, weights, method, density, majority_sign, svd_rank, svd_clamp)
    if len(adapters) == 1:
        method = "linear"
    names = sorted({n for ad in adapters for n in ad.layers}, key=_natural_key)
    if order is not None:
        rank_of = {n: i for i, n in enumerate(order)}
        names.sort(key=lambda n: rank_of.get(n, len(rank_of)))
    new_rank = svd_rank or max(lw.r for ad in adapters for lw in ad.layers.values())
    dtype = next(iter(adapters[0].layers.values())).a.dtype
    layers: dict[str, LayerWeights] = {}
    for name in names:
        parts = [(ad, ad.layers[name], w) for ad, w in zip(adapters, weights) if name in ad.layers]
        _check_layer(name, [(ad, lw) for ad, lw, _ in parts], method, svd_rank)
        a, b = _combine_layer([(lw, float(w)) for _, lw, w in parts], method, rank=new_rank,
                              density=1.0 if density is None else density, majority_sign=majority_sign,
                              svd_clamp=svd_clamp, generator=generator)
        layers[name] = LayerWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=1.0)
    return AdapterWeights(layers=layers, config=_combined_config(adapters, layers))


def _combined_config(adapters: list[AdapterWeights], layers: dict[str, LayerWeights]) -> dict:
    """PEFT ``adapter_config.json`` for the result: plain LoRA, alpha = r on every layer (scale 1)."""
    ranks = [lw.r for lw in layers.values()]
    r = max(set(ranks), key=ranks.count)
    pattern = {n: lw.r for n, lw in layers.items() if lw.r != r}
    targets = [ad.config.get("target_modules") for ad in adapters]
    if all(isinstance(t, list) for t in targets):
        target_modules: list[str] | str = sorted({x for t in targets for x in t})
    else:  # PEFT full-matches a string against module names: name exactly the combined layers
        target_modules = "(?:" + "|".join(re.escape(n) for n in layers) + ")"
    first = adapters[0].config
    return {
        "peft_type": "LORA", "task_type": first.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": first.get("base_model_name_or_path"), "revision": first.get("revision"),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": target_modules, "use_rslora": False,
        "use_dora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "layers_to_transform": None, "layers_pattern": None,
    }
