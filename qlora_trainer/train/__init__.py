"""Training: model preparation, optimizer/schedule, the loss, the loop and checkpoints.

- ``setup.py``: ``prepare_model`` (LoRA, kernels, checkpointing), ``build_optimizer``, ``build_scheduler``
- ``loss.py``: ``causal_lm_loss`` (hidden states -> chunked linear + cross-entropy)
- ``loop.py``: ``train(cfg) -> TrainResult``
- ``checkpoint.py``: exact-resume checkpoints under ``output_dir/checkpoints/step-N``
"""

from qlora_trainer.train.loop import TrainResult, train
from qlora_trainer.models.loss import causal_lm_loss
from qlora_trainer.train.setup import build_optimizer, build_scheduler, prepare_model

__all__ = ["TrainResult", "build_optimizer", "build_scheduler", "causal_lm_loss", "prepare_model", "train"]
