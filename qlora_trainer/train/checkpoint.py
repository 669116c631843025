"""Training checkpoints: everything needed to continue a run *exactly*.

``output_dir/checkpoints/step-N/`` (written aside, then renamed into place)::

    adapter/                  the adapter so far, PEFT format (usable on its own; resume restores
                              the trainable LoRA tensors from it)
    trainable.safetensors     only if some trainable tensor is not in the adapter: those, by
                              parameter name (checkpoints of earlier versions hold all of them here)
    optimizer.pt              optimizer state_dict
    scheduler.pt              LR scheduler state_dict
    rng.pt                    python / numpy / torch / cuda RNG states
    trainer_state.json        {step, epoch, batch (micro-batches consumed in that epoch), tokens, data}
    config.yaml               the run's config
    manifest.json             size and SHA-256 of every file above, written last (train/resume.py)

Loading uses ``torch.load(weights_only=True)`` and safetensors only, through the checked readers of
``qlora_trainer.io`` (a damaged file is one line naming it; ``resume=auto`` has verified the manifest
before, train/resume.py).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.config import save_config
from qlora_trainer.io import atomic_directory
from qlora_trainer.lora import save_adapter
from qlora_trainer.lora.experts import is_expert_key
from qlora_trainer.lora.peft_format import PREFIX, WEIGHTS_NAME
from qlora_trainer.lora.tokens import peft_token_key
from qlora_trainer.train import resume as checks
from qlora_trainer.train.guards import check_finite_params
from qlora_trainer.train.resume import write_manifest
from qlora_trainer.io import FIX_CHECKPOINT, read_json_object, read_safetensors, read_torch

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LORA_PARAM = re.compile(r"^(.+)\.(lora_A|lora_B|lora_magnitude_vector)\.default$")


@dataclass
class TrainerState:
    """Where the run is: optimizer steps done and the data position after them."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed
    tokens: int = 0  # loss tokens seen so far
    data: str = ""  # fingerprint of the tokenized training set (resume.data_fingerprint)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints under ``output_dir/checkpoints``, oldest step first."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: "Config") -> Path | None:
    """The checkpoint to resume from: ``resume: auto`` -> newest complete one in ``output_dir`` (None if
    there is none; damaged newer ones are moved aside with a warning), a path -> that checkpoint (error
    if missing or damaged), unset -> None."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        dirs = checkpoint_dirs(cfg.output_dir)
        found = checks.newest_complete(dirs)
        if found is None and dirs:
            raise QloraError(f"resume: no complete checkpoint in {Path(cfg.output_dir) / 'checkpoints'} (damaged "
                             f"ones were renamed *.damaged); unset resume and set output.overwrite=true to "
                             f"start over")
        return found
    path = Path(cfg.resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise QloraError(f"resume: {str(path)!r} is not a checkpoint directory (no trainer_state.json); "
                         f"use resume=auto or a path like {cfg.output_dir}/checkpoints/step-N")
    checks.check_explicit(path)
    return path


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _peft_key(name: str) -> str | None:
    """The key of trainable parameter ``name`` in the adapter's PEFT file (None: not an adapter tensor)."""
    m = _LORA_PARAM.match(name)
    if m is None:
        return peft_token_key(name, PREFIX)  # rows of added tokens (data.marker_tokens=add), or None
    return f"{PREFIX}{m[1]}.{m[2]}" + ("" if m[2] == "lora_magnitude_vector" else ".weight")


def save_checkpoint(model: nn.Module, optimizer: Any, scheduler: Any, state: TrainerState, cfg: "Config",
                    rng: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-{state.step}`` atomically, then keep only the newest ``output.keep_last``.
    ``rng``: the RNG states to store (default: the current ones)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_finite_params(model, state.step)  # never a checkpoint of NaN weights
    path = Path(cfg.output_dir) / "checkpoints" / f"step-{state.step}"
    with atomic_directory(path) as tmp:
        save_adapter(model, tmp / "adapter", cfg=cfg.lora, base_model=cfg.model.name_or_path,
                     revision=cfg.model.revision)
        with safe_open(str(tmp / "adapter" / WEIGHTS_NAME), "pt") as f:
            in_adapter = set(f.keys())
        rest = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
                if p.requires_grad and _peft_key(n) not in in_adapter}
        if rest:
            save_file(rest, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
        save_config(cfg, tmp / "config.yaml")
        write_manifest(tmp)  # last: a checkpoint with a valid manifest is complete
    prune_checkpoints(cfg.output_dir, cfg.output.keep_last)
    log.info("checkpoint saved to %s", path)
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` finished checkpoints, each renamed aside first so an
    interrupted delete never leaves a partial ``step-N``."""
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        aside = old.with_name(f".{old.name}.deleting")
        shutil.rmtree(aside, ignore_errors=True)
        old.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> TrainerState:
    """Restore trainable tensors (from the adapter, plus ``trainable.safetensors`` where present),
    optimizer and scheduler from ``path``; return its TrainerState. RNG states are restored
    separately (:func:`restore_rng`) once all set-up is done."""

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {key: n for n in params if (key := _peft_key(n)) is not None}
    tensors: dict[str, torch.Tensor] = {}
    if (path / "adapter" / WEIGHTS_NAME).is_file():
        stored = read_safetensors(path / "adapter" / WEIGHTS_NAME, FIX_CHECKPOINT)
        tensors = {names.get(k, k): t for k, t in stored.items()  # in trainable.safetensors: AdaLoRA's, the experts'
                   if not k.endswith((".lora_A", ".lora_B", ".lora_E")) and not is_expert_key(model, k, PREFIX)}
    if (path / "trainable.safetensors").is_file():
        tensors.update(read_safetensors(path / "trainable.safetensors", FIX_CHECKPOINT))
    if set(tensors) != set(params):
        missing = sorted(set(params) ^ set(tensors))[:3]
        raise QloraError(f"{path}: checkpoint does not match this model/LoRA config (e.g. {missing}); "
                         f"resume with the run's own config")
    wrong = [f"{n} {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if tensors[n].shape != p.shape]
    if wrong:
        raise QloraError(f"{path}: checkpoint tensor shapes differ from this model/LoRA config (e.g. {wrong[0]}); "
                         f"resume with the run's own config")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    optimizer.load_state_dict(read_torch(path / "optimizer.pt", FIX_CHECKPOINT))
    scheduler.load_state_dict(read_torch(path / "scheduler.pt", FIX_CHECKPOINT))
    return TrainerState(**read_json_object(path / "trainer_state.json", fix=FIX_CHECKPOINT))


def restore_rng(path: Path) -> None:
    set_rng_state(read_torch(path / "rng.pt", FIX_CHECKPOINT))
