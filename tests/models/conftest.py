"""Fixtures of the model tests."""

from __future__ import annotations

import inspect

import pytest


def _peft_reads_fused_experts() -> bool:
    """Whether the installed PEFT stores LoRA on 3-D expert weights in transformers 5's (E, out, in)
    layout (its ``ParamWrapper`` swaps in/out features; PEFT 0.18 does not)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    return "_did_swap_in_out_features" in inspect.getsource(ParamWrapper)


@pytest.fixture(scope="session")
def peft_reads_experts() -> bool:
    return _peft_reads_fused_experts()
