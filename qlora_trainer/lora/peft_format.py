"""Adapters on disk in PEFT's format, so ``peft.PeftModel.from_pretrained(base, dir)`` loads ours and
we load PEFT's (``peft`` itself is not needed at run time).

A directory holds ``adapter_config.json`` (``peft_type: LORA``, ``task_type: CAUSAL_LM``, ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``use_dora``,
``base_model_name_or_path``, ...) and ``adapter_model.safetensors`` with PEFT's key names::

    base_model.model.<module path>.lora_A.weight            (r, in)
    base_model.model.<module path>.lora_B.weight            (out, r)
    base_model.model.<module path>.lora_magnitude_vector    (out,)    DoRA only

plus, where given, the tokenizer files and our run config (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_trainer.config import LoRAConfig, save_config
from qlora_trainer.errors import QloraError
from qlora_trainer.io import atomic_directory, atomic_write_bytes, read_json_object
from qlora_trainer.lora.adalora import EPS, ada_layers
from qlora_trainer.io import FIX_ADAPTER, read_safetensors
from qlora_trainer.lora.experts import (attach_expert_weights, expert_state_dict, split_expert_entries,
                                       target_parameters)
from qlora_trainer.lora.layer import AdapterSpec, LoRALinear
from qlora_trainer.lora.multi import lora_layers, set_active_adapter
from qlora_trainer.lora.router import attach_router_weights, router_state_dict, router_targets, split_router_entries
from qlora_trainer.lora.weights import AdapterWeights, LayerWeights
from qlora_trainer.lora.inject import replace_module, set_trainable
from qlora_trainer.lora.modules import linear_layers
from qlora_trainer.models.moe import experts_modules
from qlora_trainer.lora.tokens import PEFT_SUFFIX, load_token_rows, peft_token_entries
from qlora_trainer.runtime import resolve_dtype
from qlora_trainer.io import mark_output

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
             ".lora_magnitude_vector.weight": "m", ".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}  # last 3: AdaLoRA


# transformers-4 names of MoE expert projections and routers. On a model with fused experts, PEFT >= 0.22
# reads these bare names (or a regex, resolved to leaf names) in ``target_modules`` as an adapter saved
# for transformers 4 and moves them onto the fused experts with a doubled rank: e.g. Qwen2-MoE's shared
# expert's ``gate_proj`` would resize ``experts.gate_up_proj``'s adapter.
_V4_EXPERT_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate"})


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly ``names``: the list of last name components when that
    selects nothing else, else a regular expression PEFT full-matches against module names. On a model
    with fused MoE experts, never a bare transformers-4 expert name nor a regex (see
    :data:`_V4_EXPERT_NAMES`): name suffixes of two components, else the full names."""
    linear = linear_layers(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    exact = {n for n in linear if n.rsplit(".", 1)[-1] in suffixes} == set(names)
    if not experts_modules(model):
        return suffixes if exact else "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"
    if exact and not _V4_EXPERT_NAMES.intersection(suffixes):
        return suffixes
    pairs = sorted({".".join(n.split(".")[-2:]) for n in names})
    if {n for n in linear if ".".join(n.split(".")[-2:]) in pairs} == set(names):
        return pairs
    return sorted(names)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter ``adapter_name`` (contiguous CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.specs:
            continue
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name]
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name]
        if layer.specs[adapter_name].use_dora:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def model_adapter_weights(model: nn.Module, adapter_name: str = "default") -> AdapterWeights:
    """Adapter ``adapter_name`` of ``model`` as ``AdapterWeights`` (detached CPU copies), with a PEFT
    config that reproduces each layer's scale (``alpha_pattern`` where alphas differ)."""
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.specs}
    if not layers:
        raise QloraError(f"the model has no adapter named {adapter_name!r}")
    specs = {n: layer.specs[adapter_name] for n, layer in layers.items()}
    first = next(iter(specs.values()))
    weights = {n: LayerWeights(a=layer.lora_A[adapter_name].detach().cpu().clone(),
                               b=layer.lora_B[adapter_name].detach().cpu().clone(), scale=specs[n].scale,
                               magnitude=layer.lora_magnitude_vector[adapter_name].detach().cpu().clone()
                               if specs[n].use_dora else None)
               for n, layer in layers.items()}
    config = {"peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.use_rslora,
              "use_dora": first.use_dora, "lora_dropout": first.dropout,
              "target_modules": _target_modules(model, list(layers)),
              "alpha_pattern": {n: sp.alpha for n, sp in specs.items() if sp.alpha != first.alpha}}
    return AdapterWeights(layers=weights, config=config)


def weights_state_dict(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of ``weights`` (an adapter apart from a model)."""
    out: dict[str, torch.Tensor] = {}
    for name, lw in weights.layers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = lw.a.detach().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = lw.b.detach().cpu().contiguous()
        if lw.magnitude is not None:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = lw.magnitude.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, *, cfg: LoRAConfig, base_model: str,
                 adapter_name: str = "default", tokenizer: Any = None, run_config: Any = None,
                 revision: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to ``out_dir`` in PEFT's format.

    A new directory appears whole (built aside, then renamed); into an existing one each file is
    replaced atomically and other files are left alone. ``tokenizer`` (``save_pretrained``) and
    ``run_config`` (our ``Config``, as ``config.yaml``) are saved alongside when given.
    """
    if cfg.variant == "adalora":

        total = run_config.train.max_steps if run_config is not None else None
        tensors, fields = adalora_tensors_and_config(model, adapter_name, cfg, total)
    else:
        tensors, fields = adapter_state_dict(model, adapter_name), {}
        fields |= _expert_fields(model, adapter_name, tensors)
    if not tensors:
        raise QloraError(f"save_adapter: the model has no adapter named {adapter_name!r}")

    token_tensors, token_indices = peft_token_entries(model, PREFIX)  # rows of added tokens (lora/tokens.py)
    tensors |= token_tensors
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.specs}
    names = list(layers)
    spec = layers[names[0]].specs[adapter_name]
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "revision": revision, "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": _target_modules(model, names), "use_rslora": spec.use_rslora,
        "use_dora": spec.use_dora, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True if cfg.init in ("kaiming", "loftq") else cfg.init, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "trainable_token_indices": token_indices,
        **fields,
    }
    return write_adapter_dir(out_dir, adapter_config, tensors, tokenizer=tokenizer, run_config=run_config)


# the first PEFT release that loads LoRA on transformers 5's fused experts ((E, out, in) weights) and
# on 2-D router weights, through target_parameters (0.18 reads 3-D weights as (E, in, out); 0.19 fails
# on transformers' weight converters)
PEFT_FOR_MOE = "0.20.0"
_SAID_MOE: set[tuple[str, ...]] = set()


def _expert_fields(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Adds the fused MoE experts' and routers' adapter tensors (lora/experts.py, lora/router.py) to
    ``tensors``; returns the config fields they need: ``target_parameters``, and ``lora_dropout`` 0
    (PEFT's ``ParamWrapper`` refuses dropout; ours ran on the linear layers only, and dropout does not
    change the saved model)."""
    params = sorted(target_parameters(model, adapter_name) + router_targets(model, adapter_name))
    if not params:
        return {}
    tensors |= expert_state_dict(model, adapter_name, PREFIX) | router_state_dict(model, adapter_name, PREFIX)
    if tuple(params) not in _SAID_MOE:  # once per run, not at every checkpoint
        _SAID_MOE.add(tuple(params))
        log.info("adapter %s adapts mixture-of-experts weights (%s): PEFT loads it from release %s on",
                 adapter_name, ", ".join(params), PEFT_FOR_MOE)
    return {"target_parameters": params, "lora_dropout": 0.0}


def write_adapter_dir(out_dir: str | Path, adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                      tokenizer: Any = None, run_config: Any = None, copy_files: list[Path] = (),
                      replace: bool = False, marker: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT-keyed ``tensors``), plus the
    tokenizer, our run config and ``copy_files`` where given.

    A new directory appears whole (built aside, then renamed); into an existing one each file is
    replaced atomically and other files are left alone, unless ``replace`` swaps in the whole new
    directory in one rename. ``marker``: the command that writes it, recorded as its output marker
    (``qlora_trainer.io.mark_output``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staging = Path(tmp)
        for f in copy_files:
            (staging / f.name).write_bytes(f.read_bytes())
        (staging / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if run_config is not None:
            save_config(run_config, staging / "config.yaml")
        if marker is not None:
            mark_output(staging, marker)
        if not out_dir.exists() or replace:
            with atomic_directory(out_dir, replace=replace) as target:
                for f in staging.iterdir():
                    f.rename(target / f.name)
        else:
            for f in sorted(staging.iterdir()):
                atomic_write_bytes(out_dir / f.name, f.read_bytes())
    return out_dir


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter directory, checked to be a PEFT LoRA adapter."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise QloraError(f"{path}: no {CONFIG_NAME}; expected a PEFT LoRA adapter directory")
    config = read_json_object(file, fix=FIX_ADAPTER)
    if config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
        raise QloraError(f"{file}: peft_type {config.get('peft_type')!r} is not supported (LORA or ADALORA)")
    for key in ("modules_to_save", "layer_replication"):
        if config.get(key):
            raise QloraError(f"{file}: {key} is not supported by qlora_trainer's loader")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: a key matches a module name ending in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def _group(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, kind in _SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[kind] = t
                break
        else:
            raise QloraError(f"{file}: unsupported tensor {key!r} (only lora_A/lora_B/lora_magnitude_vector)")
    return modules


def read_adapter(path: str | Path) -> AdapterWeights:
    """A PEFT-format LoRA/rsLoRA/DoRA adapter directory (ours or PEFT's) as ``AdapterWeights`` (CPU,
    as stored), with each layer's scale from ``lora_alpha``/``alpha_pattern``, its rank from A."""
    path = Path(path)
    config = read_adapter_config(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        other = " (adapter_model.bin is not read: safetensors only)" if (path / "adapter_model.bin").exists() else ""
        raise QloraError(f"{path}: no {WEIGHTS_NAME}{other}")

    use_dora, use_rslora = bool(config.get("use_dora", False)), bool(config.get("use_rslora", False))
    tensors = read_safetensors(file, FIX_ADAPTER)
    token_rows = {k: tensors.pop(k) for k in list(tensors) if k.endswith(PEFT_SUFFIX)}  # added tokens' rows
    groups = _group(tensors, file)
    if config.get("peft_type") == "ADALORA":

        return AdapterWeights(layers=adalora_as_lora(groups, config, file), config=config, path=path,
                              token_rows=token_rows)
    layers: dict[str, LayerWeights] = {}
    for name, parts in groups.items():
        if "A" not in parts or "B" not in parts or (use_dora and "m" not in parts):
            raise QloraError(f"{file}: incomplete tensors for {name!r} (have {sorted(parts)})")
        a, b = parts["A"], parts["B"]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise QloraError(f"{file}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not (r, in), (out, r)")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        scale = AdapterSpec(r=r, alpha=alpha, use_rslora=use_rslora).scale
        layers[name] = LayerWeights(a=a, b=b, scale=scale, magnitude=parts.get("m") if use_dora else None)
    return AdapterWeights(layers=layers, config=config, path=path, token_rows=token_rows)


def load_adapter(model: nn.Module, path: str | Path, *, adapter_name: str = "default",
                 dtype: torch.dtype | None = None, backend: str = "auto", trainable: bool = False) -> list[str]:
    """Load a PEFT-format LoRA/rsLoRA/DoRA adapter (ours or PEFT's) onto ``model`` as ``adapter_name``
    and make it active. The base stays as it is; other adapters stay loaded. ``dtype`` defaults to
    the runtime's compute dtype for the model's device. Everything is frozen except, with
    ``trainable``, this adapter's parameters. Returns the adapted module names."""
    return attach_adapter(model, read_adapter(path), adapter_name=adapter_name, dtype=dtype, backend=backend,
                          trainable=trainable)


def attach_adapter(model: nn.Module, weights: AdapterWeights, *, adapter_name: str = "default",
                   dtype: torch.dtype | None = None, backend: str = "auto", trainable: bool = False) -> list[str]:
    """Put ``weights`` on ``model`` as adapter ``adapter_name`` (see :func:`load_adapter`)."""
    config = weights.config
    file = weights.path / WEIGHTS_NAME if weights.path is not None else Path(weights.name)
    if dtype is None:
        dtype = resolve_dtype("auto", next(model.parameters()).device)
    use_dora = weights.use_dora
    experts = split_expert_entries(model, weights.layers, config)  # fused MoE experts (lora/experts.py)
    attach_expert_weights(model, experts, weights.layers, config, adapter_name=adapter_name, dtype=dtype,
                          where=str(file))
    routers = split_router_entries(model, weights.layers, config)  # MoE routers (lora/router.py)
    attach_router_weights(model, routers, weights.layers, config, adapter_name=adapter_name, dtype=dtype,
                          where=str(file))
    for name, lw in weights.layers.items():
        if name in experts or name in routers:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QloraError(f"{file}: adapter module {name!r} is not in the model; is it the right base "
                             f"({config.get('base_model_name_or_path')})?") from None
        a, b, r = lw.a, lw.b, lw.r
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        spec = AdapterSpec(r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                           use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora)
        if config.get("peft_type") == "ADALORA":  # scale alpha / init_r, not alpha / (kept rank)
            spec = AdapterSpec(r=r, alpha=lw.scale * r, dropout=spec.dropout)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, backend=backend)
            replace_module(model, name, module)
        if a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            raise QloraError(f"{file}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                             f"a ({module.out_features}, {module.in_features}) layer")
        if adapter_name in module.specs:
            raise QloraError(f"an adapter named {adapter_name!r} is already loaded; pick another name")
        # added without DoRA (no magnitude init from a dequantized W), the loaded magnitude is set below
        module.add_adapter(adapter_name, dataclasses.replace(spec, use_dora=False), dtype=dtype)
        module.specs[adapter_name] = spec
        device = module.lora_A[adapter_name].device
        module.lora_A[adapter_name].data = a.to(device, dtype)
        module.lora_B[adapter_name].data = b.to(device, dtype)
        if use_dora:
            module.lora_magnitude_vector[adapter_name] = nn.Parameter(lw.magnitude.to(device, dtype))
    load_token_rows(model, weights.token_rows, config.get("trainable_token_indices"), PREFIX, str(file))
    set_active_adapter(model, adapter_name)
    for p in model.parameters():  # the base is frozen; adapters train only when asked
        p.requires_grad_(False)
    if trainable:
        set_trainable(model, adapter_name)
    return list(weights.layers)


# -- AdaLoRA in PEFT's format (SVD-form triplets) ----------------------------------------------------

def adalora_tensors_and_config(model: nn.Module, name: str, cfg: "LoRAConfig", total_step: int | None = None
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT AdaLoRA-format tensors (pruned to the kept triplets once ranks are final) and config fields
    (``total_step``: the run's ``train.max_steps``; PEFT needs one > tinit + tfinal)."""
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for n, layer in ada_layers(model, name).items():
        a, b, e = layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.lora_E[name].detach()
        mask = layer.rank_mask.get(name)
        if mask is not None:
            keep = torch.tensor(mask, device=a.device)
            a, b, e = a[keep], b[:, keep], e[keep]
            pattern[f"{n}.lora_E"] = mask
        for key, t in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            tensors[f"{PREFIX}{n}.{key}"] = t.cpu().contiguous()
    r0 = cfg.r
    fields = {"peft_type": "ADALORA", "init_r": r0, "target_r": cfg.adalora.target_r, "tinit": cfg.adalora.tinit,
              "tfinal": cfg.adalora.tfinal, "deltaT": cfg.adalora.delta_t, "beta1": cfg.adalora.beta1,
              "beta2": cfg.adalora.beta2, "orth_reg_weight": cfg.adalora.orth_reg_weight,
              "total_step": total_step or cfg.adalora.tinit + cfg.adalora.tfinal + 1, "rank_pattern": pattern or None,
              "r": 8}
    return tensors, fields


def adalora_as_lora(groups: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], file: Any) -> dict:
    """PEFT AdaLoRA tensors (module -> {A, E, B}) as plain LoRA ``LayerWeights``: A' = E ⊙ A, scale
    alpha / (init_r + 1e-5); layers pruned to rank 0 are left out (they add nothing)."""
    r0 = float(config.get("init_r", 12))
    alpha = float(config.get("lora_alpha", 8))
    scale = (alpha if alpha > 0 else r0) / (r0 + EPS)
    layers = {}
    for name, parts in groups.items():
        if not {"A", "B", "E"} <= set(parts):
            raise QloraError(f"{file}: incomplete AdaLoRA tensors for {name!r} (have {sorted(parts)})")
        a, b, e = parts["A"], parts["B"], parts["E"]
        if a.shape[0] == 0:
            continue
        layers[name] = LayerWeights(a=(a.float() * e.float()).to(a.dtype), b=b, scale=scale)
    return layers
