"""Which attention implementation a model runs (``model.attn_implementation``), and the model class a
transformers config builds, with one-line errors for what we cannot build.

``auto`` (the default) picks, for the model class the config builds:

* ``flash_attention_2`` on CUDA in 16 bits when the ``flash_attn`` package is installed and the
  class supports it (it also computes Gemma 2's logit soft-capping);
* else ``eager`` when the config soft-caps attention logits (``attn_logit_softcapping``, Gemma 2):
  sdpa cannot apply the cap (transformers >= 5.24 refuses sdpa for Gemma 2; earlier releases drop
  the cap silently);
* else ``sdpa`` where the class supports it, else ``eager``.

Any other value is passed to transformers as given; a value transformers refuses for that class is a
one-line :class:`~qlora_trainer.errors.QloraError`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qlora_trainer.errors import QloraError

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def causal_lm_class(config: Any) -> type:
    """The ``*ForCausalLM`` class transformers builds for ``config``; a one-line QloraError naming the
    ``model_type`` when transformers has no causal-LM class for it."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    try:
        return mapping[type(config)]
    except (KeyError, ValueError):
        model_type = getattr(config, "model_type", type(config).__name__)
        raise QloraError(f"model: {model_type!r} ({type(config).__name__}) has no causal-LM class in transformers; "
                         f"qlora_trainer fine-tunes decoder-only text models (Llama, Mistral, Qwen, Gemma, Phi, "
                         f"OLMo, Mixtral, ...)") from None


def _softcaps_attention(config: Any) -> bool:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "attn_logit_softcapping", None) is not None


def _flash_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def choose_attention(config: Any, requested: str = "auto", *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """(implementation, reason) for a model of ``config`` run on ``device`` in ``dtype``.

    ``requested`` other than ``auto`` is returned as is (reason ``"set in the config"``)."""
    if requested != "auto":
        return requested, "set in model.attn_implementation"
    cls = causal_lm_class(config)
    cuda_16bit = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if cuda_16bit and getattr(cls, "_supports_flash_attn", False) and _flash_available():
        return "flash_attention_2", f"flash-attn installed and supported by {cls.__name__}"
    if _softcaps_attention(config):
        return "eager", f"{cls.__name__} soft-caps attention logits, which sdpa cannot"
    if getattr(cls, "_supports_sdpa", False):
        return "sdpa", f"supported by {cls.__name__}"
    return "eager", f"{cls.__name__} supports no fused attention"


def attention_for(config: Any, requested: str, *, device: torch.device | str, dtype: torch.dtype) -> str:
    """:func:`choose_attention`, logged once (the start-up log states the choice)."""
    impl, reason = choose_attention(config, requested, device=device, dtype=dtype)
    log.info("attention: %s (%s)", impl, reason)
    return impl


def refused_attention(e: ValueError, impl: str | None, config: Any) -> QloraError | None:
    """The one-line error for transformers refusing ``impl`` for ``config``'s class, or None when
    ``e`` is about something else."""
    text = str(e)
    if impl is None or ("attention" not in text.lower() and impl not in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    cut = first.split(". ")[0]
    return QloraError(f"model.attn_implementation: {impl!r} is refused for "
                      f"{getattr(config, 'model_type', '?')}: {cut}; use 'auto' (or 'eager')")
