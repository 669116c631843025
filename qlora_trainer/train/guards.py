"""Guards around a run: the output location before anything loads, our own temporaries, non-finite steps.

- :func:`check_output_location`: ``output_dir`` must be (or become) a writable directory; a path that is
  a file, lies inside a file, or cannot be written is refused before the model or data load.
- :func:`clean_temporaries`: removes what a killed run of ours leaves (``checkpoints/.step-N.*.tmp``,
  ``.step-N.deleting``, ``.step-N.old``, ``.adapter.*``, ``.metrics.jsonl.*.tmp``), at start and end.
  Only those names are touched; anything else in ``output_dir`` is the user's.
- :class:`StepGuard`: a step whose loss or gradient norm is not finite is never applied. Up to
  ``train.skip_bad_steps`` such steps are skipped; the next one stops the run with an error naming the
  step (the caller saves the last good step first). :func:`check_finite_params` keeps NaN weights out
  of any checkpoint or adapter.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
import torch

from qlora_trainer.errors import QloraError
from qlora_trainer.evaluate.tasks import check_eval_tasks
from qlora_trainer.models.check import check_model_source

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)

# our temporary names: io.atomic_* (".NAME.XXXX.tmp", ".NAME.old"), prune (".step-N.deleting"),
# save_adapter's staging directory (".adapter.XXXX")
_OURS = {
    ".": re.compile(r"^\.(adapter\.[\w-]+(\.tmp)?|adapter\.old|metrics\.jsonl\.[\w-]+\.tmp)$"),
    "checkpoints": re.compile(r"^\.step-\d+(\.[\w-]+\.tmp|\.deleting|\.old)$"),
    "adapter": re.compile(r"^\.[\w.-]+\.\w{8}\.tmp$"),  # io.atomic_write_bytes into an existing adapter
}


def preflight(cfg: "Config", out: Path) -> None:
    """Everything checkable before loading: the output location, our leftovers, the model directory,
    the generation-eval tasks."""
    check_output_location(out)
    clean_temporaries(out)
    check_model_source(cfg.model)
    check_eval_tasks(cfg.eval.tasks or [])


def check_output_location(out: Path) -> None:
    """Create ``out`` if needed and prove it writable; one-line QloraError otherwise."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == out else f"is inside {str(parent)!r}, which is a file"
                raise QloraError(f"output_dir: {str(out)!r} {where}; choose a directory path for output_dir")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise QloraError(f"output_dir: {str(parent)!r} is not writable; choose another output_dir "
                                 f"or fix its permissions")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise QloraError(f"output_dir: cannot write in {str(out)!r} ({e.strerror or e}); choose another "
                         f"output_dir") from None


def clean_temporaries(out: Path) -> list[Path]:
    """Delete our own temporaries under ``out``; return what was removed."""
    removed = []
    for sub, pattern in _OURS.items():
        root = out / sub
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if pattern.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d temporaries left by an earlier run: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


class NonFiniteError(QloraError):
    """Training produced a non-finite loss or gradient norm (or weights)."""


class StepGuard:
    """Decides what happens to a step with a non-finite loss or gradient norm."""

    def __init__(self, skip_budget: int, on_stop: Callable[[], None]) -> None:
        """``on_stop`` runs before the run stops (the loop saves the last good step there)."""
        self.skip_budget, self.on_stop = skip_budget, on_stop
        self.skipped: list[int] = []

    def bad(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when step ``step`` must not be applied (skip it); raises NonFiniteError past the budget."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        what = f"loss {loss} and gradient norm {grad_norm}"
        if len(self.skipped) < self.skip_budget:
            self.skipped.append(step)
            log.warning("step %d: %s; skipped (%d of train.skip_bad_steps=%d)", step, what,
                        len(self.skipped), self.skip_budget)
            return True
        try:
            self.on_stop()
        except NonFiniteError as e:  # the last step's update already broke the weights: keep older checkpoints
            log.warning("%s", e)
        skipped = f" after skipping steps {self.skipped}" if self.skipped else ""
        raise NonFiniteError(f"train: step {step}: {what}{skipped}; stopped without applying it (the last good "
                             f"step is {step - 1}): lower train.lr (then resume=auto resume_allow_changes=true continues from "
                             f"the last checkpoint), keep train.max_grad_norm > 0, or set train.skip_bad_steps=N "
                             f"to skip such steps")


def check_finite_params(model: torch.nn.Module, step: int) -> None:
    """Refuse to save trainable weights that hold NaN/inf."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):  # one sync
        return
    for name, p in params:
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"train: after step {step} the trainable weight {name} is not finite; nothing "
                                 f"was saved for this step (lower train.lr or keep train.max_grad_norm > 0)")
