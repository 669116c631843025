"""Load a mixture-of-experts checkpoint straight into NF4: the device never holds the 16-bit experts.

transformers 5 holds the experts of Mixtral, Qwen3-MoE, ... as fused 3-D parameters, which its
bitsandbytes loading leaves in 16 bits: ``from_pretrained`` puts all of them on the device before
``models.moe.quantize_experts`` can replace them (Mixtral-8x7B ~90 GB, Qwen3-30B-A3B ~60 GB). Here:

1. the model skeleton is built on the meta device (``accelerate.init_empty_weights`` with real
   buffers such as rotary ``inv_freq``), from the config only;
2. tensors are streamed from the safetensors files (``models/moe_checkpoint.py``), one at a time:
   each ``nn.Linear`` but the output embeddings becomes a bitsandbytes NF4 ``Linear4bit`` quantized on
   the device (as transformers' ``BitsAndBytesConfig`` does), every other tensor is cast and moved;
3. each fused experts module becomes ``models.moe.NF4Experts`` filled expert by expert
   (:func:`nf4_expert_weight`): expert e of an (E, out, in) weight is whole NF4 blocks of the
   (E * out, in) view (``kernels/experts.py``), so its packed bytes and fp32 absmax are a contiguous
   slice of the result. Double quantization needs the mean of *all* absmax of the tensor
   (bitsandbytes: ``offset = absmax.mean()``, then ``quantize_blockwise(absmax - offset, 256)``), so
   the fp32 absmax (1/16 of the 16-bit size at blocksize 64) is kept until the last expert is in.
   The result is bit-identical to ``NF4Experts.from_module`` on the same weights.

Transient 16-bit bytes on the device: one tensor, or one expert's ``gate_up_proj`` (2I, H).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_trainer.errors import QloraError
from qlora_trainer.kernels.experts import experts_quantizable
from qlora_trainer.models.moe import EXPERT_PARAMS, NF4Experts, experts_modules
from qlora_trainer.models.moe_checkpoint import Checkpoint, ExpertSource, checkpoint_files, expert_keys, model_key
from qlora_trainer.models.quantize import quantize_linear

log = logging.getLogger(__name__)


def nf4_expert_weight(read: Callable[[int], torch.Tensor], num_experts: int, *, compute_dtype: torch.dtype,
                      double_quant: bool = True, blocksize: int = 64, quant_storage: torch.dtype = torch.uint8,
                      device: torch.device | str = "cpu") -> Any:
    """A bitsandbytes NF4 ``Params4bit`` of the (E * out, in) view of an (E, out, in) weight whose
    expert e (out, in) is ``read(e)``, quantized one expert at a time on ``device``.

    Equal, bit for bit, to ``Params4bit(W.reshape(E * out, in).to(compute_dtype))`` moved to
    ``device`` (packed bytes, absmax, and the double-quant state: offset, absmax2, code2)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_4bit, quantize_blockwise

    packed = absmax = None
    expert_shape: tuple[int, ...] = ()
    for e in range(num_experts):
        w = read(e).to(compute_dtype).contiguous().to(device)  # as Params4bit: cast where read, then move
        q, state = quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4",
                                 quant_storage=quant_storage)
        if packed is None:
            expert_shape = tuple(w.shape)
            packed = torch.empty((num_experts * q.shape[0], *q.shape[1:]), dtype=q.dtype, device=q.device)
            absmax = torch.empty(num_experts * state.absmax.numel(), dtype=state.absmax.dtype, device=q.device)
        rows, nb = q.shape[0], state.absmax.numel()
        packed[e * rows:(e + 1) * rows] = q
        absmax[e * nb:(e + 1) * nb] = state.absmax
        del w, q, state
    assert packed is not None and absmax is not None
    shape = torch.Size((num_experts * expert_shape[0], expert_shape[1]))
    code = get_4bit_type("nf4", device=packed.device)
    if double_quant:  # bitsandbytes' quantize_4bit(compress_statistics=True), on the whole tensor's absmax
        offset = absmax.mean()
        qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        qs = QuantState(absmax=qabsmax, shape=shape, dtype=compute_dtype, blocksize=blocksize, code=code,
                        quant_type="nf4", offset=offset, state2=state2)
    else:
        qs = QuantState(absmax=absmax, shape=shape, dtype=compute_dtype, blocksize=blocksize, code=code,
                        quant_type="nf4")
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=blocksize,
                             compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage,
                             bnb_quantized=True)


EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")  # Mixtral | Qwen-MoE, OLMoE | ...


def has_experts(hf_config: Any) -> bool:
    """Whether the transformers config names a number of experts (cheap test before building a skeleton)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return any(isinstance(getattr(text, f, None), int) and getattr(text, f) > 1 for f in EXPERT_COUNT_FIELDS)


def model_skeleton(hf_config: Any, *, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """The ``*ForCausalLM`` of ``hf_config`` with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation)


def streams_experts(skeleton: nn.Module, blocksize: int) -> bool:
    """Whether ``skeleton`` has fused experts modules, all quantizable expert by expert at ``blocksize``."""
    experts = experts_modules(skeleton)
    return bool(experts) and all(experts_quantizable(getattr(m, n).shape[1], getattr(m, n).shape[2], blocksize)
                                 for m in experts.values() for n in EXPERT_PARAMS)


def load_moe_nf4(directory: Path, skeleton: nn.Module, *, dtype: torch.dtype, device: torch.device,
                 double_quant: bool = True, blocksize: int = 64,
                 quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Fill ``skeleton`` (:func:`model_skeleton`) from the safetensors checkpoint in ``directory``, in NF4
    on ``device``: linears but the output embeddings as ``Linear4bit``, fused experts as
    ``NF4Experts``, the rest in its skeleton dtype. Returns the model in eval mode."""
    quant = dict(compute_dtype=dtype, double_quant=double_quant, blocksize=blocksize, quant_storage=quant_storage)
    files = checkpoint_files(directory)
    with Checkpoint(files) as ckpt:
        names = _tensor_names(skeleton)
        experts = experts_modules(skeleton)
        per_expert = expert_keys(list(files), set(experts))
        taken = set(per_expert.values())
        tensors: dict[str, str] = {}  # model name -> checkpoint key
        for key in files:
            name = model_key(key, names) if key not in taken else None
            if name is not None:
                tensors[name] = key
            elif key not in taken:
                log.warning("%s: checkpoint tensor %s is not used by %s", files[key].name, key,
                            type(skeleton).__name__)
        for name, module in experts.items():
            fused = {n: tensors.pop(n) for n in [f"{name}.{p}" for p in EXPERT_PARAMS] if n in tensors}
            src = ExpertSource(ckpt, name, getattr(module, EXPERT_PARAMS[0]).shape[0], per_expert, fused)
            skeleton.set_submodule(name, _nf4_experts(module, src, device=device, **quant))
        n_linear = _fill_linears(skeleton, ckpt, tensors, device=device, **quant)
        for name, key in tensors.items():
            _set_tensor(skeleton, name, _read(ckpt, key, _tensor(skeleton, name)), device)
    skeleton.tie_weights()
    _check_complete(skeleton, directory)
    for module in skeleton.modules():  # buffers made on the CPU with the skeleton (rotary inv_freq, ...)
        for b, buf in module._buffers.items():
            if buf is not None:
                module._buffers[b] = buf.to(device)
    log.info("streamed %s into NF4: %d linears, %d fused experts modules quantized while loading",
             directory, n_linear, len(experts))
    return skeleton.eval()


def _tensor_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module), leaf)


def _read(ckpt: Checkpoint, key: str, like: torch.Tensor) -> torch.Tensor:
    """Checkpoint tensor ``key`` in ``like``'s dtype; a one-line error when its shape differs."""
    t = ckpt.tensor(key)
    if tuple(t.shape) != tuple(like.shape):
        raise QloraError(f"{ckpt.files[key]}: {key} has shape {tuple(t.shape)}, the model built from config.json "
                         f"expects {tuple(like.shape)}; the checkpoint and its config.json do not match")
    return t.to(like.dtype) if t.is_floating_point() else t


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value.to(device), requires_grad=False)
    else:
        module._buffers[leaf] = value.to(device)


def _nf4_experts(module: nn.Module, src: ExpertSource, *, device: torch.device, **quant: Any) -> NF4Experts:
    """``module`` (a meta fused experts module) as NF4Experts, read expert by expert from ``src``."""
    params = []
    for name in EXPERT_PARAMS:
        expected = tuple(getattr(module, name).shape[1:])

        def read(e: int, name: str = name, expected: tuple[int, ...] = expected) -> torch.Tensor:
            w = src.read(name, e)
            if tuple(w.shape) != expected:
                raise QloraError(f"checkpoint: expert {e} of {src.module}.{name} has shape {tuple(w.shape)}, "
                                 f"the model built from config.json expects {expected} (keys {src.keys()[:2]})")
            return w
        params.append(nf4_expert_weight(read, src.num_experts, device=device, **quant))
    new = NF4Experts(*params, num_experts=src.num_experts, act_fn=module.act_fn, compute_dtype=quant["compute_dtype"])
    return new.train(module.training)


def _fill_linears(model: nn.Module, ckpt: Checkpoint, tensors: dict[str, str], *, device: torch.device,
                  compute_dtype: torch.dtype, **quant: Any) -> int:
    """Replace each meta ``nn.Linear`` but the output embeddings by an NF4 ``Linear4bit`` made from its
    checkpoint weight (popped from ``tensors``); returns how many."""
    skip = model.get_output_embeddings()
    n = 0
    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear or linear is skip or f"{name}.weight" not in tensors:
            continue
        dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        dense.weight = nn.Parameter(_read(ckpt, tensors.pop(f"{name}.weight"), linear.weight), requires_grad=False)
        if linear.bias is not None and f"{name}.bias" in tensors:
            dense.bias = nn.Parameter(_read(ckpt, tensors.pop(f"{name}.bias"), linear.bias), requires_grad=False)
        model.set_submodule(name, quantize_linear(dense, compute_dtype=compute_dtype, device=device, **quant))
        n += 1
    return n


def _check_complete(model: nn.Module, directory: Path) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise QloraError(f"{directory}: the checkpoint has no tensor {name!r} (nor a name we map to it); "
                             f"download the model again, or check that config.json belongs to these weights")
