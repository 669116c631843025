"""Triton kernels and their pure-torch references, installed as ``qlora_trainer.kernels``.

Layering per op (Liger-Kernel style): Triton kernel -> launcher -> ``torch.autograd.Function`` ->
``nn.Module``/function, with a torch reference that is both the CPU fallback and the test oracle.
``dispatch.py`` is the one place that decides which runs. Nothing here imports the rest of
``qlora_trainer``.
"""

from qlora_trainer.kernels.cross_entropy import linear_cross_entropy
from qlora_trainer.kernels.dispatch import lora_matmul, resolve_backend
from qlora_trainer.kernels.lora_linear import lora_linear
from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4
from qlora_trainer.kernels.rmsnorm import rms_norm
from qlora_trainer.kernels.rope import apply_rope
from qlora_trainer.kernels.swiglu import swiglu

__all__ = ["lora_matmul", "resolve_backend", "linear_cross_entropy", "lora_linear", "NF4Weight",
           "dequantize_nf4", "rms_norm", "apply_rope", "swiglu"]
