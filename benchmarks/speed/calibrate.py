"""Fit the speed model's efficiency factors to measurements; the H100 references; leave-one-out.

Two kinds of measurement (:data:`COMPONENTS`, :data:`STEPS`), both HF stack on an H100 (the reference rows):

* profiled **components**: the step's linear GEMMs and bitsandbytes' dequantizations. These fix
  ``gemm`` (the mean of measured/predicted over both shapes, in log space) and the bitsandbytes
  dequant's bandwidth and per-call GPU cost (``dequant_bnb``, ``bnb_call_us``: two equations, two
  unknowns) directly.
* **step times** (tokens/s of four rows): these fit the host cost per launch ``launch_us``, by least
  squares of log(predicted/measured) over a grid (no scipy); measured rows of our trainer, when
  there are any, fit ``ours_launch_us`` the same way.

``benchmarks/results/*.json`` rows (``benchmarks/README.md``: ``system`` hf|qlora_trainer, ``model``,
``seq_len``, ``batch``, ``status`` ok, ``tokens_per_s``; the file's ``device.gpu``) are step times
too: :func:`default_efficiency` refits on them (H100/H200 rows) when any exist. Unsloth figures are
kept for comparison only (we do not model Unsloth).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.speed.devices import Efficiency, get_device
from benchmarks.speed.recipes import StepOptions


@dataclass(frozen=True)
class StepRow:
    """A measured step: ``system`` (hf | ours) on catalog ``model`` at batch x seq_len, tokens/s."""

    system: str
    model: str
    seq_len: int
    tokens_per_s: float
    batch: int = 1
    gpu: str = "h100"
    source: str = "reference rows (HF stack, H100)"

    @property
    def step_s(self) -> float:
        return self.batch * self.seq_len / self.tokens_per_s


# The H100 measurements we have (benchmarks/README.md reference table).
STEPS = (StepRow("hf", "llama-3-8b", 2048, 3626.0), StepRow("hf", "llama-2-7b", 512, 678.0),
         StepRow("hf", "llama-2-70b", 512, 398.0), StepRow("hf", "llama-3-70b", 512, 327.0))
# (model, seq_len) -> profiled seconds of the HF step's linear GEMMs and bitsandbytes dequants.
COMPONENTS = {("llama-3-8b", 2048): {"gemm": 0.119, "dequant": 0.061},
              ("llama-2-7b", 512): {"gemm": 0.029, "dequant": 0.058}}
UNSLOTH = {("llama-3-8b", 2048): 4743.0, ("llama-2-7b", 512): 1480.0}  # tok/s, for comparison only
STEP_FIT = ("launch_us",)
_GRID = {"launch_us": [2.0 * 1.06 ** k for k in range(60)], "ours_launch_us": [2.0 * 1.06 ** k for k in range(60)],
         "attention_fp32": [0.08 * 1.06 ** k for k in range(45)]}


def _arch(name: str):
    from qlora_trainer.models.catalog import get_arch

    return get_arch(name)


def _hf(seq: int, batch: int = 1) -> StepOptions:
    return StepOptions(system="hf", seq_len=seq, batch=batch)


def fit_components(eff: Efficiency, components: dict = COMPONENTS, gpu: str = "h100") -> Efficiency:
    """``gemm``, ``dequant_bnb`` and ``bnb_call_us`` from profiled component times."""
    from benchmarks.speed.devices import op_seconds
    from benchmarks.speed.recipes import step_ops

    dev = get_device(gpu)
    unit = eff.with_(gemm=1.0, dequant_bnb=1.0, bnb_call_us=0.0)
    logs, rows = [], []
    for (model, seq), meas in components.items():
        ops = step_ops(_arch(model), _hf(seq))
        gemm_s = sum(op_seconds(op, dev, unit)[0] * op.count for op in ops
                     if op.kind == "gemm" and op.name.startswith("base"))
        logs.append(math.log(gemm_s / meas["gemm"]))
        deq = [op for op in ops if op.kind == "dequant_bnb"]
        rows.append((sum(op.total_bytes for op in deq) / (dev.hbm_gbs * 1e9),
                     sum(op.count * op.host_calls for op in deq) * 1e-6, meas["dequant"]))
    gemm = math.exp(sum(logs) / len(logs))
    (a1, c1, y1), (a2, c2, y2) = rows[:2]          # y = a / eff + c * call_us, solved exactly
    det = a1 * c2 - a2 * c1
    inv_eff, call = (y1 * c2 - y2 * c1) / det, (a1 * y2 - a2 * y1) / det
    if inv_eff <= 0 or call < 0:                   # degenerate measurements: bandwidth term only
        inv_eff, call = sum(y for *_, y in rows) / sum(a for a, *_ in rows), 0.0
    return eff.with_(gemm=min(gemm, 1.0), dequant_bnb=min(1.0 / inv_eff, 1.0), bnb_call_us=call)


def predicted_step_s(row: StepRow, eff: Efficiency) -> float:
    from benchmarks.speed.report import predict

    opts = StepOptions(system="hf" if row.system == "hf" else "ours", seq_len=row.seq_len, batch=row.batch)
    return predict(_arch(row.model), opts, row.gpu, eff).seconds


def _loss(rows, eff: Efficiency) -> float:
    return sum(math.log(predicted_step_s(r, eff) / r.step_s) ** 2 for r in rows)


def fit_steps(rows, eff: Efficiency, names: tuple[str, ...] = STEP_FIT, sweeps: int = 2) -> Efficiency:
    """Coordinate-wise grid search of ``names`` minimising sum log(pred/meas)^2 over ``rows``."""
    for _ in range(sweeps):
        for name in names:
            eff = min((eff.with_(**{name: v}) for v in _GRID[name]), key=lambda e: _loss(rows, e))
    return eff


def fit(rows=STEPS, components: dict = COMPONENTS) -> Efficiency:
    """All fitted constants: components first, then ``launch_us`` on the HF rows, then (when there
    are measured rows of ours) ``ours_launch_us`` on ours."""
    eff = fit_steps(tuple(r for r in rows if r.system == "hf"), fit_components(Efficiency(), components))
    ours = tuple(r for r in rows if r.system == "ours")
    return fit_steps(ours, eff, ("ours_launch_us",)) if ours else eff


@functools.lru_cache(maxsize=1)
def _fitted_h100() -> Efficiency:
    return fit(STEPS + tuple(load_results()))


def default_efficiency(gpu: str = "h100") -> Efficiency:
    """The constants every prediction uses: fitted on the H100 references plus any committed
    ``benchmarks/results/*.json`` rows; other GPUs reuse them (predicted, not calibrated)."""
    return _fitted_h100()


def leave_one_out(rows=STEPS, components: dict = COMPONENTS) -> list[dict]:
    """For each row: fit the step parameters on the others, predict it. Returns rows with
    measured and predicted tok/s, the error, and the constants fitted without it."""
    base = fit_components(Efficiency(), components)
    out = []
    for i, row in enumerate(rows):
        eff = fit_steps(rows[:i] + rows[i + 1:], base)
        pred = row.batch * row.seq_len / predicted_step_s(row, eff)
        out.append({"model": row.model, "seq_len": row.seq_len, "measured_tok_s": row.tokens_per_s,
                    "predicted_tok_s": round(pred, 1), "error": round(pred / row.tokens_per_s - 1, 4),
                    **{k: round(getattr(eff, k), 3) for k in STEP_FIT}})
    return out


def load_results(root: str | Path | None = None) -> list[StepRow]:
    """Step rows of ``benchmarks/results/*.json`` (status ok, a catalog model, an H100/H200 GPU,
    system hf or qlora_trainer); unreadable files are skipped. Default root: the repository's."""
    import json

    root = Path(root) if root is not None else Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    rows: list[StepRow] = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows += rows_from_doc(doc, source=path.name)
    return rows


def rows_from_doc(doc: dict, source: str = "") -> list[StepRow]:
    """The usable step rows of one results document (``benchmarks/results.py`` format)."""
    from qlora_trainer.models.catalog import CATALOG

    gpu_name = str((doc.get("device") or {}).get("gpu", "")).lower()
    gpu = "h200" if "h200" in gpu_name else "h100" if "h100" in gpu_name else None
    out = []
    for r in doc.get("rows", []) if gpu else []:
        if r.get("kind", "step") != "step" or r.get("status") != "ok" or r.get("model") not in CATALOG:
            continue
        if r.get("extra") or r.get("cap_gb"):  # variants (compile, checkpoint plan, caps): not the fitted recipe
            continue
        system = {"hf": "hf", "qlora_trainer": "ours"}.get(r.get("system"))
        tok = r.get("tokens_per_s")
        if system and isinstance(tok, (int, float)) and tok > 0:
            out.append(StepRow(system, r["model"], int(r["seq_len"]), float(tok), int(r.get("batch", 1)),
                               gpu=gpu, source=source))
    return out


__all__ = ["COMPONENTS", "STEPS", "STEP_FIT", "StepRow", "UNSLOTH", "default_efficiency", "fit",
           "fit_components", "fit_steps", "leave_one_out", "load_results", "predicted_step_s", "rows_from_doc"]
