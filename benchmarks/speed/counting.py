"""Count what a piece of code launches: Triton launcher calls by label, aten GEMMs (and their FLOPs),
dropout-mask draws and every other non-view aten op outside the launchers.

The step model (``recipes.step_ops``) and the speed work (docs/speed.md) read the same numbers from
here, so the model and the code cannot drift apart (tests/benchmarks/speed/test_counts.py,
tests/train/test_step_counts.py). On the CPU each aten op stands for one CUDA launch; each Triton
launcher call for one kernel launch (run under ``TRITON_INTERPRET=1``)::

    with StepCounter() as c:
        loss, n = causal_lm_loss(model, batch, backend="triton")
        (loss / n).backward()
    c.launches["dequant"], c.gemms, c.flops, c.total_launches
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

LAUNCHERS = {  # (module in qlora_trainer.kernels, launcher function) -> the step model's op name
    ("_triton_nf4", "nf4_dequant"): "dequant", ("_triton_nf4", "nf4_dequant_group"): "dequant",
    ("_triton_rmsnorm", "rmsnorm_fwd"): "rmsnorm.fwd",
    ("_triton_rmsnorm", "rmsnorm_bwd"): "rmsnorm.bwd", ("_triton_rope", "rope_launch"): "rope",
    ("_triton_swiglu", "swiglu_fwd"): "swiglu.fwd", ("_triton_swiglu", "swiglu_bwd"): "swiglu.bwd",
    ("_triton_ce", "ce_chunk"): "ce.chunk", ("_triton_lora", "nf4_matmul"): "fused",
    ("_triton_nf4_gemm", "nf4_gemm"): "fused",  # the large-M NF4 GEMM (performance.nf4_matmul: fused)
    ("_triton_dropout", "dropout_launch"): "lora.dropout",
    ("_triton_rmsnorm", "add_rmsnorm_fwd"): "add_rmsnorm.fwd", ("_triton_rmsnorm", "add_rmsnorm_bwd"): "add_rmsnorm.bwd",
}
GEMMS = {"mm", "addmm", "addmm_"}
NOT_LAUNCHES = {"detach", "empty", "empty_like", "empty_strided", "lift_fresh", "alias", "_unsafe_view",
                "new_empty", "new_empty_strided"}


class StepCounter(TorchDispatchMode):
    """A dispatch mode that also wraps every Triton launcher in :data:`LAUNCHERS` while active.

    ``launches`` (Counter by label), ``gemms`` / ``flops`` (aten GEMMs outside the launchers, FLOPs
    2·m·k·n from the operand shapes), ``bernoulli`` (dropout-mask draws), ``aten`` (Counter of every
    other non-view aten op outside the launchers)."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms, self.flops, self.bernoulli, self.inside = 0, 0.0, 0, 0
        self.aten: Counter = Counter()
        self.launches: Counter = Counter()
        self._undo: list[tuple[Any, str, Any]] = []

    @property
    def total_launches(self) -> int:
        """aten ops outside the launchers + Triton launches."""
        return sum(self.aten.values()) + sum(self.launches.values())

    def __enter__(self):
        for (mod, fn), label in LAUNCHERS.items():
            m = importlib.import_module(f"qlora_trainer.kernels.{mod}")
            orig = getattr(m, fn)
            self._undo.append((m, fn, orig))
            setattr(m, fn, self._wrap(orig, label))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for m, fn, orig in reversed(self._undo):
                setattr(m, fn, orig)
            self._undo.clear()

    def _wrap(self, orig, label: str):
        def wrapped(*a, **k):
            self.launches[label] += 1
            self.inside += 1
            try:
                return orig(*a, **k)
            finally:
                self.inside -= 1

        return wrapped

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside:
            if name in GEMMS:
                a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
                self.gemms += 1
                self.flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            if name == "bernoulli_":
                self.bernoulli += 1
            if not func.is_view and name not in NOT_LAUNCHES:
                self.aten[name] += 1
        return func(*args, **(kwargs or {}))
