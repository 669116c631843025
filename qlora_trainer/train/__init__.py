"""Training: model preparation, optimizer/schedule, the recipe and checkpoints (the loss is
``models/loss.py``'s ``causal_lm_loss``, re-exported here).

- ``setup.py``: ``prepare_model`` (LoRA, kernels, checkpointing), ``build_optimizer``, ``build_scheduler``
- ``recipe.py``: ``Recipe`` (``setup_*``, ``step``, ``train``, ``save_checkpoint``, hooks) and ``train(cfg) -> TrainResult``
- ``loop.py``: the loop's parts (micro-batch stream, signals, metrics file)
- ``checkpoint.py``: exact-resume checkpoints under ``output_dir/checkpoints/step-N``
"""

from qlora_trainer.train.recipe import Recipe, TrainResult, train
from qlora_trainer.models.loss import causal_lm_loss
from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model

__all__ = ["Recipe", "TrainResult", "build_optimizer", "build_scheduler", "causal_lm_loss", "prepare_model", "train"]
