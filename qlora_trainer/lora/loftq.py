"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization").

QLoRA starts from NF4(W) + s B A with B = 0, so training first has to undo the quantization error
W - NF4(W). LoftQ picks A (r, in) and B (out, r) so that Q + s B A approximates W from the start,
alternating T times::

    target = W
    repeat T times:  Q = NF4(target)                       # the 4-bit base
                     U S V^T = svd(W - deq(Q))             # rank-r fit of what Q misses
                     L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T
                     target = W - L R
    B = L / sqrt(s), A = R / sqrt(s)                      # so s B A = L R

With T = 1 the base is exactly NF4(W), the same as any NF4 load of the model, so the adapter fits
every later load (``generate``, ``merge``, PEFT). T > 1 also re-quantizes the base, Q = NF4(W - L R)
of the previous step: lower error, but the base must be rebuilt the same way wherever the adapter
is used (``rebuild_loftq_base``, done by ``load_with_adapters`` from the run config).

The 16-bit W comes from a ``WeightSource`` one layer at a time (a safetensors checkpoint is read
tensor by tensor), so no more than one 16-bit layer is held at once on top of the NF4 model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.lora.base import base_compute_dtype, dequantized_weight, frozen_linear
from qlora_trainer.lora.modules import replace_module
from qlora_trainer.lora.multi import lora_layers
from qlora_trainer.models.load import RANDOM_PREFIX, _random_base
from qlora_trainer.models.quantize import is_4bit, quantize_linear
from qlora_trainer.runtime import expand_path

if TYPE_CHECKING:
    from qlora_trainer.config import Config
    from qlora_trainer.lora.weights import AdapterWeights

log = logging.getLogger(__name__)

WeightSource = Callable[[str], torch.Tensor]  # module path -> its 16-bit weight (out, in)


def nf4_like(w: torch.Tensor, like: nn.Module) -> nn.Module:
    """A frozen ``Linear4bit`` holding NF4(``w``) with ``like``'s quantization settings and bias."""
    qs = like.weight.quant_state
    dense = frozen_linear(like, w, base_compute_dtype(like))
    return quantize_linear(dense, compute_dtype=base_compute_dtype(like), double_quant=bool(qs.nested), quant_type=qs.quant_type,
                           quant_storage=like.weight.quant_storage, blocksize=qs.blocksize,
                           device=like.weight.device)


@torch.no_grad()
def loftq_factors(w: torch.Tensor, quantize: Callable[[torch.Tensor], nn.Module], r: int, scale: float,
                  iters: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ for one layer: (the 4-bit base Q, A (r, in), B (out, r)), fp32 factors, s B A = L R.

    ``w`` (out, in) is the 16-bit weight; ``quantize`` makes a 4-bit layer of a dense weight."""
    if iters < 1:
        raise ValueError(f"loftq iters must be >= 1 (got {iters})")
    w = w.float()
    target = w
    for t in range(iters):
        q = quantize(target)
        u, s, vh = torch.linalg.svd(w - dequantized_weight(q).float(), full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
        if t + 1 < iters:
            target = w - left @ right
    k = 1.0 / math.sqrt(scale)
    return q, right * k, left * k


def quantization_error(w: torch.Tensor, base: nn.Module, a: torch.Tensor | None = None,
                       b: torch.Tensor | None = None, scale: float = 1.0) -> float:
    """||W - (deq(base) + s B A)||_F (without A, B: plain ||W - deq(base)||_F)."""
    approx = dequantized_weight(base).float()
    if a is not None and b is not None:
        approx = approx + scale * (b.float() @ a.float())
    return torch.linalg.matrix_norm(w.float() - approx).item()


@torch.no_grad()
def apply_loftq(model: nn.Module, source: WeightSource, *, adapter_name: str = "default",
                iters: int = 1) -> dict[str, tuple[float, float]]:
    """Set adapter ``adapter_name``'s A, B on every adapted 4-bit layer by LoftQ (T = ``iters``); with
    T > 1 each layer's base becomes the re-quantized Q. W comes from ``source`` one layer at a time
    and is dropped before the next. Returns module -> (plain NF4 error, LoftQ error), Frobenius."""
    errors: dict[str, tuple[float, float]] = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.specs:
            continue
        base = layer.base_layer
        if not is_4bit(base):
            raise QloraError(f"lora.init: loftq: {name} is not a 4-bit layer (LoftQ needs model.quantization=nf4)")
        spec = layer.specs[adapter_name]
        w = source(name).to(base.weight.device, torch.float32)
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise QloraError(f"lora.init: loftq: the 16-bit weight of {name} is {tuple(w.shape)}, the layer "
                             f"({layer.out_features}, {layer.in_features}); is it the same checkpoint?")
        q, a, b = loftq_factors(w, lambda t: nf4_like(t, base), spec.r, spec.scale, iters)
        plain = quantization_error(w, base) if iters > 1 else None
        if iters > 1:
            layer.base_layer = q
        layer.lora_A[adapter_name].copy_(a)
        layer.lora_B[adapter_name].copy_(b)
        after = quantization_error(w, layer.base_layer, a, b, spec.scale)
        errors[name] = (plain if plain is not None else quantization_error(w, base), after)
        del w, q, a, b
    if errors:
        ratio = sum(e[1] for e in errors.values()) / max(sum(e[0] for e in errors.values()), 1e-30)
        log.info("LoftQ (%d iteration(s)) on %d layers: ||W - (Q + s B A)|| is %.3f of plain NF4's error",
                 iters, len(errors), ratio)
    return errors


@torch.no_grad()
def rebuild_loftq_base(model: nn.Module, adapter: "AdapterWeights", source: WeightSource, iters: int) -> None:
    """Re-create the re-quantized base a T > 1 LoftQ run trained on (deterministic from W), for every
    layer ``adapter`` adapts; call before the adapter is loaded. T = 1 changes nothing."""
    if iters <= 1:
        return
    for name, lw in adapter.layers.items():
        base = model.get_submodule(name)
        w = source(name).to(base.weight.device, torch.float32)
        q, _, _ = loftq_factors(w, lambda t: nf4_like(t, base), lw.r, lw.scale, iters)
        replace_module(model, name, q)
        del w, q


# -- where the 16-bit weights come from ------------------------------------------------------------

def checkpoint_source(directory: str | Path) -> WeightSource:
    """Read ``<module>.weight`` from a directory's safetensors checkpoint (single file or sharded with
    ``model.safetensors.index.json``), one tensor per call."""
    import json

    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = {k: directory / f for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    else:
        single = directory / "model.safetensors"
        if not single.is_file():
            raise QloraError(f"lora.init: loftq needs the 16-bit safetensors checkpoint; none in {directory}")
        with safe_open(str(single), framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)

    def read(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key not in files:
            raise QloraError(f"lora.init: loftq: {key} is not in the checkpoint {directory}")
        with safe_open(str(files[key]), framework="pt") as f:
            return f.get_tensor(key)

    return read


def weight_source(cfg: "Config", vocab_size: int | None = None) -> WeightSource:
    """The 16-bit weights of ``model.name_or_path``: a ``random:`` model rebuilt in-process (same
    seed and ``vocab_size``; tiny models only hold it whole), a local directory, or the hub cache of
    a model id (already downloaded by the NF4 load)."""
    name = cfg.model.name_or_path
    if name.startswith(RANDOM_PREFIX):
        dense = _random_base(_dense_cfg(cfg), device=torch.device("cpu"), dtype=torch.float32,
                             vocab_size=vocab_size)
        return lambda module: dense.get_submodule(module).weight.detach()
    path = Path(expand_path(name))
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, revision=cfg.model.revision, allow_patterns=["*.safetensors*"]))
    return checkpoint_source(path)


def apply_loftq_from_config(model: nn.Module, cfg: "Config", adapter_name: str = "default") -> dict:
    """``apply_loftq`` with the run config's ``lora.loftq_iters`` and the model's 16-bit source."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return apply_loftq(model, weight_source(cfg, vocab), adapter_name=adapter_name, iters=cfg.lora.loftq_iters)


def _dense_cfg(cfg: "Config") -> "Config":
    import copy

    dense = copy.deepcopy(cfg)
    dense.model.quantization = "none"
    return dense
