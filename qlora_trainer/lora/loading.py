"""Base model + tokenizer + adapters from adapter directories (what ``generate`` and ``merge`` need).

The base is described by the adapter directory itself: our ``config.yaml`` (the run's full config:
model path, quantization, seed of a ``random:`` model, ...) when present, else PEFT's
``adapter_config.json`` ``base_model_name_or_path`` with default settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qlora_trainer.config import Config, apply_override, load_config
from qlora_trainer.errors import QloraError
from qlora_trainer.lora.loftq import rebuild_loftq_base, weight_source
from qlora_trainer.lora.multi import hotswap_adapter, prepare_hotswap, set_active_adapter
from qlora_trainer.lora.peft_format import load_adapter, read_adapter, read_adapter_config
from qlora_trainer.models.load import load_base_model, load_tokenizer
from qlora_trainer.runtime import resolve_device, resolve_dtype
from qlora_trainer.io import FIX_ADAPTER, first_line
from qlora_trainer.models.check import check_tokenizer_files
from qlora_trainer.runtime import expand_path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    """A base model with adapters loaded; ``names[i]`` is the adapter from ``dirs[i]``."""

    model: nn.Module
    tokenizer: Any
    config: Config
    names: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    swaps: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> (slot, AdapterWeights)

    def activate(self, name: str | None) -> None:
        """Make adapter ``name`` the one the model runs (``None``: the base): hot-swapped into its slot
        when loaded with ``hotswap=True``, else switched to."""
        if name in self.swaps:
            slot, weights = self.swaps[name]
            hotswap_adapter(self.model, weights, name=slot)
        else:
            set_active_adapter(self.model, name)


def run_config_for(adapter_dir: str | Path | None, *, base: str | None = None,
                   overrides: list[str] | None = None) -> Config:
    """The run config describing ``adapter_dir``'s base model (``base`` replaces its path)."""
    if adapter_dir is not None and (Path(adapter_dir) / "config.yaml").is_file():
        cfg = load_config(Path(adapter_dir) / "config.yaml", fix=FIX_ADAPTER, ours=True)
    else:
        cfg = Config()
        if adapter_dir is not None:
            name = read_adapter_config(adapter_dir).get("base_model_name_or_path")
            if not name and base is None:
                raise QloraError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass --base")
            cfg.model.name_or_path = name or cfg.model.name_or_path
    if base is not None:
        cfg.model.name_or_path = base
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def local_bases(adapter_dirs: list[str | Path], base: str | None = None) -> list[Path]:
    """The local base model directories ``adapter_dirs`` (or ``base``) name: inputs an output must
    not overlap (hub ids and ``random:`` models are none)."""

    names = [base] if base is not None else [run_config_for(d).model.name_or_path for d in adapter_dirs[:1]]
    return [Path(expand_path(n)) for n in names if n and Path(expand_path(n)).exists()]


def _unique_names(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        stem = d.resolve().name
        stem = d.resolve().parent.name if stem == "adapter" else stem  # runs/<name>/adapter -> <name>
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}-{i}", i + 1
        names.append(name)
    return names


def load_with_adapters(adapter_dirs: list[str | Path], *, base: str | None = None,
                       overrides: list[str] | None = None, device: str | None = None,
                       hotswap: bool = False) -> LoadedModel:
    """Load the (NF4) base once and every adapter onto it; the last one is active.

    With ``hotswap`` the adapters are not added side by side: one slot (two when DoRA and plain
    adapters are mixed) of the largest rank takes each in turn, in place (:meth:`LoadedModel.activate`,
    ``qlora_trainer.lora.multi.hotswap_adapter``). Adapters trained on different bases are an error
    unless ``base`` is given.
    """
    dirs = [Path(d) for d in adapter_dirs]
    bases = {read_adapter_config(d).get("base_model_name_or_path") for d in dirs}
    if len(bases) > 1 and base is None:
        raise QloraError(f"adapters were trained on different bases ({', '.join(map(str, sorted(bases, key=str)))}); "
                         f"pass --base to choose one")
    cfg = run_config_for(dirs[0] if dirs else None, base=base, overrides=overrides)
    if device is not None:
        cfg.train.device = device
    dev = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model.compute_dtype, dev)
    tok_dir = next((d for d in dirs if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        check_tokenizer_files(tok_dir, fix=FIX_ADAPTER)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a damaged tokenizer.model (sentencepiece)
            raise QloraError(f"{tok_dir}: its tokenizer files cannot be loaded ({first_line(e)}); "
                             f"{FIX_ADAPTER}") from None
    else:
        tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg, device=dev, dtype=dtype, vocab_size=len(tokenizer))
    names = _unique_names(dirs)
    adapter_dtype = resolve_dtype(cfg.lora.dtype, dev)
    if dirs and cfg.lora.init == "loftq" and cfg.lora.loftq_iters > 1 and cfg.model.quantization == "nf4":
        # the adapter was trained on a LoftQ re-quantized base: rebuild it (deterministic from W)

        rebuild_loftq_base(model, read_adapter(dirs[0]), weight_source(cfg, len(tokenizer)), cfg.lora.loftq_iters)
    swaps: dict[str, tuple[str, Any]] = {}
    if hotswap and any(read_adapter_config(d).get("target_parameters") for d in dirs):
        log.info("adapters on mixture-of-experts weights cannot share a hot-swap slot: loaded side by side")
        hotswap = False
    if hotswap and dirs:
        weights = [read_adapter(d) for d in dirs]
        for dora in sorted({w.use_dora for w in weights}):
            group = [w for w in weights if w.use_dora == dora]
            slot = "hotswap-dora" if dora else "hotswap"
            prepare_hotswap(model, group, name=slot, dtype=adapter_dtype, backend=cfg.performance.kernels)
            swaps.update({n: (slot, w) for n, w in zip(names, weights) if w.use_dora == dora})
    else:
        for d, name in zip(dirs, names):
            load_adapter(model, d, adapter_name=name, dtype=adapter_dtype, backend=cfg.performance.kernels)
    loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, config=cfg, names=names, dirs=dirs, swaps=swaps)
    if swaps:
        loaded.activate(names[-1])
    return loaded
