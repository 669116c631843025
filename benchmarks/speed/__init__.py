"""Speed: a roofline model of one training step (predictions, not measurements; docs/speed-model.md).

- ``ops.py``: per-op FLOPs / bytes / launches primitives (``Op``)
- ``recipes.py``: the ops of one step, ours (with its options and planned-work switches) and the HF stack
- ``devices.py``: GPU table, efficiency factors, op -> seconds
- ``calibrate.py``: fitting to the H100 references / ``benchmarks/results``; leave-one-out
- ``report.py``: ``predict``, ``predict_for_config``, per-op breakdown, markdown
"""

from benchmarks.speed.recipes import StepOptions, step_ops
from benchmarks.speed.report import StepPrediction, predict, predict_for_config

__all__ = ["StepOptions", "StepPrediction", "predict", "predict_for_config", "step_ops"]
