"""Experiment trackers (``output.report_to``) through accelerate's tracker API.

The training ``Accelerator`` is built with ``log_with=`` the configured trackers that are installed
(:func:`accelerator_kwargs`); :func:`start_trackers` calls ``init_trackers`` with the flattened run
config and the memory estimate, and returns a :class:`TrackedMetrics` that writes each metrics row to
``metrics.jsonl`` (unchanged) and to ``accelerator.log``. Offline-safe: a tracker whose package is
missing, that cannot start (no network, no login) or fails later is dropped with one warning line;
training never stops for a tracker. Local trackers write under ``output_dir/tracking/<run name>``.

wandb without an API key (``WANDB_API_KEY`` or ``wandb login``) and no ``WANDB_MODE`` runs in offline
mode (``wandb sync`` uploads it later) instead of prompting or waiting for the network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_trainer.memory import GB, estimate_for_config

if TYPE_CHECKING:
    from qlora_trainer.config import Config

log = logging.getLogger(__name__)

TRACKING_DIR = "tracking"


def available_trackers(names: list[str]) -> list[str]:
    """The trackers of ``names`` whose package is installed; a one-line warning for each missing one."""
    import accelerate.utils as au

    out = []
    for name in dict.fromkeys(names):
        probe = getattr(au, f"is_{name}_available", None)
        if probe is not None and probe():
            out.append(name)
        else:
            pkg = "comet-ml" if name == "comet_ml" else name
            log.warning("output.report_to: %s is not installed; not logging to it (pip install %s)", name, pkg)
    return out


def accelerator_kwargs(cfg: "Config") -> dict[str, Any]:
    """``Accelerator(**...)`` arguments: ``log_with`` the installed trackers, ``project_dir`` for local logs."""
    names = available_trackers(cfg.output.report_to) if cfg.output.report_to else []
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(Path(cfg.output_dir) / TRACKING_DIR)}


def flat_config(cfg: "Config") -> dict[str, Any]:
    """``section.key`` -> value with lists and dicts as strings (TensorBoard hparams take scalars only)."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for key, v in d.items():
            if isinstance(v, dict) and prefix + key != "data.fields":  # sections, nested ones too
                walk(v, f"{prefix}{key}.")
            else:
                out[prefix + key] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    walk(cfg.to_dict(), "")
    return out


def memory_metrics(cfg: "Config") -> dict[str, float]:
    """The estimator's peak and components (GB) for ``cfg``, or {} when the shape is unknown offline."""
    try:
        est = estimate_for_config(cfg)
    except Exception:  # noqa: BLE001 - advisory, as in the loop's own estimate log line
        return {}
    if est is None:
        return {}
    row = {"memory/estimate_gb": round(est.total_gb, 4)}
    row |= {f"memory/{k}_gb": round(v / GB, 4) for k, v in est.components.items()}
    return row


class TrackedMetrics:
    """``metrics.jsonl`` writer that also logs each row to the accelerator's trackers (step = ``row['step']``)."""

    def __init__(self, metrics: Any, accelerator: Any) -> None:
        self.metrics, self.accelerator = metrics, accelerator

    def write(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)
        if not getattr(self.accelerator, "trackers", None):
            return
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        self._guarded(lambda: self.accelerator.log(values, step=row.get("step")))

    def end(self) -> None:
        """Flush and close the trackers (``end_training``)."""
        if getattr(self.accelerator, "trackers", None):
            self._guarded(lambda: [t.finish() for t in self.accelerator.trackers])
            self.accelerator.trackers = []

    def _guarded(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            names = ", ".join(t.name for t in self.accelerator.trackers)
            log.warning("output.report_to: %s failed (%s: %s); not logging to it any more", names,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.accelerator.trackers = []


def start_trackers(accelerator: Any, cfg: "Config", metrics: Any) -> TrackedMetrics:
    """``init_trackers`` with the run config, log the memory estimate at step 0, and wrap ``metrics``."""
    tracked = TrackedMetrics(metrics, accelerator)
    if not getattr(accelerator, "log_with", None):
        return tracked
    run = cfg.output.run_name or Path(cfg.output_dir).resolve().name or "qlora-trainer"
    init_kwargs = {}
    if "wandb" in [str(t) for t in accelerator.log_with] and not _wandb_online_ready():
        log.warning("output.report_to: wandb has no API key (WANDB_API_KEY / wandb login); logging offline "
                    "(upload later with `wandb sync`)")
        init_kwargs["wandb"] = {"mode": "offline", "dir": str(Path(cfg.output_dir) / TRACKING_DIR)}
    try:
        accelerator.init_trackers(run, config=flat_config(cfg), init_kwargs=init_kwargs)
    except Exception as e:  # noqa: BLE001 - no network, bad login, ...: warn and train on
        log.warning("output.report_to: trackers could not start (%s: %s); logging to metrics.jsonl only",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        accelerator.trackers = []
        return tracked
    mem = memory_metrics(cfg)
    if mem and accelerator.trackers:
        tracked._guarded(lambda: accelerator.log(mem, step=0))
    return tracked


def _wandb_online_ready() -> bool:
    """An explicit ``WANDB_MODE`` or an API key (environment or ``~/.netrc``) means wandb may go online."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
