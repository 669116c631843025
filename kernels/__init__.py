"""Triton kernels and their pure-torch references, installed as ``qlora_trainer.kernels``.

Layering per op (Liger-Kernel style): Triton kernel -> launcher -> ``torch.autograd.Function`` ->
``nn.Module``/function, with a torch reference that is both the CPU fallback and the test oracle.
``dispatch.py`` is the one place that decides which runs. Nothing here imports the rest of
``qlora_trainer``.

This folder sits at the repository's top level but is only ever ``qlora_trainer.kernels``: imported
as a bare ``kernels`` (from the repo root, ``sys.path`` holds ``.``) it would impersonate the
Hugging Face ``kernels`` package that transformers and bitsandbytes probe for. So it hands the name
to that package where one is installed elsewhere on ``sys.path`` (transformers >= 5.25 requires it
and imports it), and otherwise refuses.
"""

if __name__ == "kernels":  # imported under the bare name
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    _hf = _spec is not None and _spec.loader is not None and _spec.origin is not None

if __name__ == "kernels" and _hf:  # Hugging Face's package takes the name (not a namespace folder)
    _sys.modules["kernels"] = _module = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)  # `import kernels` returns what sys.modules holds: theirs
elif __name__ == "kernels":  # none installed: inert, and every use says why
    __file__ = None  # transformers' probe reads "no version, no file" as "not installed"
    __path__: list[str] = []  # no submodules either

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("the repository's kernels/ folder is qlora_trainer.kernels, not the Hugging Face "
                          "`kernels` package: import qlora_trainer.kernels (run from outside the repo root, "
                          "or install the Hugging Face package if you need it)")
else:
    from qlora_trainer.kernels.cross_entropy import linear_cross_entropy
    from qlora_trainer.kernels.dispatch import lora_matmul, resolve_backend
    from qlora_trainer.kernels.lora_linear import lora_linear
    from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4
    from qlora_trainer.kernels.rmsnorm import rms_norm
    from qlora_trainer.kernels.rope import apply_rope
    from qlora_trainer.kernels.swiglu import swiglu

    __all__ = ["lora_matmul", "resolve_backend", "linear_cross_entropy", "lora_linear", "NF4Weight",
               "dequantize_nf4", "rms_norm", "apply_rope", "swiglu"]
