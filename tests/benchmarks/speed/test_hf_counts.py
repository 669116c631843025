"""The HF-stack recipe's counts against a real CPU step of transformers + PEFT + bitsandbytes.

The tiny model is prepared as ``benchmarks/systems/hf.py`` does (``prepare_model_for_kbit_training``
fp32 upcast, non-reentrant checkpointing, fp32 LoRA on all linears, dropout 0) and one forward +
backward runs under a ``TorchDispatchMode`` that counts aten and bitsandbytes ops. Two code paths
differ from CUDA and are accounted for explicitly: on the CPU bitsandbytes' forward is one fused
``gemm_4bit`` op where CUDA runs ``dequantize_4bit`` (3 kernels: absmax dequant, += offset, 4-bit
dequant) + a cuBLAS GEMM; and on the CPU PEFT picks its generic LoRA layer, which lacks the bnb
layer's defensive ``result.clone()``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_trainer.models.catalog import CATALOG
from benchmarks.speed.recipes import StepOptions, step_ops

pytest.importorskip("peft")
NOT_LAUNCHES = {"detach", "empty", "empty_like", "empty_strided", "lift_fresh", "alias", "_unsafe_view",
                "new_empty", "new_empty_strided"}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.mm_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_LAUNCHES:
            self.ops[name] += 1
        if name == "mm":
            self.mm_flops += 2.0 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        return func(*args, **(kwargs or {}))


def test_hf_recipe_counts_equal_a_real_peft_bnb_step():
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_trainer.models.synthetic import synthetic_nf4_model

    arch, seq, r = CATALOG["tiny"], 96, 8
    model = synthetic_nf4_model(arch, device="cpu", compute_dtype=torch.bfloat16)
    import bitsandbytes as bnb

    for m in model.modules():  # bitsandbytes' own compute, as from_pretrained gives the HF stack
        if isinstance(m, bnb.nn.Linear4bit):
            m.__class__ = bnb.nn.Linear4bit
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if not model.is_gradient_checkpointing:  # as benchmarks/systems/hf.py
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, arch.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    mode = _Ops()
    with mode:
        model(input_ids=ids, labels=ids).loss.backward()
    got = mode.ops

    ops = [op for op in step_ops(arch, StepOptions(system="hf", kernels=False, seq_len=seq, lora_r=r))
           if op.phase != "optimizer"]
    deq = {ph: sum(op.count for op in ops if op.kind == "dequant_bnb" and op.phase == ph)
           for ph in ("forward", "recompute", "backward")}
    assert got["gemm_4bit"] == deq["forward"] + deq["recompute"] == 2 * 28   # CUDA: dequant + GEMM
    assert got["dequantize_4bit"] == got["dequantize_blockwise"] == deq["backward"] == 28
    # every aten GEMM but the base forward ones (inside gemm_4bit here): LoRA, base dx, lm_head
    mm = [op for op in ops if op.kind.startswith("gemm") and not (op.name == "base" and op.phase != "backward")]
    assert got["mm"] == sum(op.count for op in mm)
    assert mode.mm_flops == pytest.approx(sum(op.total_flops for op in mm), rel=1e-9)
    casts = sum(op.count for op in ops if op.name.startswith("hf.cast"))
    assert casts <= got["_to_copy"] <= casts + 2                                # + logits/labels dtype
    # all launches: CUDA = CPU + 3 per 4-bit forward matmul (4 kernels instead of 1) + PEFT's clone
    cuda_equiv = sum(got.values()) + 3 * got["gemm_4bit"]
    modelled = sum(op.total_launches for op in ops if op.name != "hf.clone")
    print(f"HF tiny step: {cuda_equiv} launches (CUDA-equivalent) vs {modelled} modelled")
    assert modelled == pytest.approx(cuda_equiv, rel=0.05)
