"""Triton kernels and their pure-torch references, installed as ``qlora_trainer.kernels``.

Layering per op (Liger-Kernel style): Triton kernel -> launcher -> ``torch.autograd.Function`` ->
``nn.Module``/function, with a torch reference that is both the CPU fallback and the test oracle.
``dispatch.py`` is the one place that decides which runs. Nothing here imports the rest of
``qlora_trainer``.
"""

from qlora_trainer.kernels.dispatch import lora_matmul, resolve_backend

__all__ = ["lora_matmul", "resolve_backend"]
