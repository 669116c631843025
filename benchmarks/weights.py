"""Seed-determined random weights, identical for every benchmarked system.

Each tensor is a function of (seed, tensor name, generator device) only: N(0, 0.02) rounded to
bf16 for matrices and embeddings (transformers' ``initializer_range``), ones for norms. Two ways to
get them into a model, both giving the same tensors:

* :func:`write_checkpoint` writes a bf16 safetensors checkpoint (one shard per decoder layer) plus
  config and the byte tokenizer, loadable by ``from_pretrained`` (HF stack), Unsloth and ours.
* :func:`build_nf4_in_process` builds the model on the meta device and materializes it tensor by
  tensor on the GPU, quantizing each linear layer to NF4 as it goes, so a 70B model never exists in
  16 bits (its 140 GB checkpoint would not fit the GPU machine's disk).

CLI (used by the runner, in its own process): ``python -m benchmarks.weights ARCH DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from torch import nn

INIT_STD = 0.02


def generator_device() -> torch.device:
    """Tensors are generated on CUDA when present (fast for 70B), else on the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_for(name: str, shape: tuple[int, ...], *, seed: int, device: torch.device) -> torch.Tensor:
    """The bf16 tensor called ``name`` (a state-dict key) of shape ``shape`` for ``seed``."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
    w = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, INIT_STD, generator=g)
    return w.to(torch.bfloat16)


def hf_config(arch_name: str):
    """transformers config of the catalog arch, with bf16 dtype and the byte tokenizer's special ids."""
    from qlora_trainer.models.catalog import get_arch

    cfg = get_arch(arch_name).to_hf_config()
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 257, 258, 259
    cfg.dtype = "bfloat16"
    return cfg


def _meta_model(cfg, dtype: torch.dtype):
    """The model skeleton: parameters on meta, buffers (rotary inv_freq) real on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _shard_of(name: str) -> str:
    parts = name.split(".")
    return f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "other"


def write_checkpoint(arch_name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the random bf16 checkpoint of ``arch_name`` to ``out_dir`` atomically; returns it.

    ``out_dir/bench_weights.json`` records (arch, seed, generator device); an existing directory with
    the same stamp is reused.
    """
    from safetensors.torch import save_file

    from qlora_trainer.io import atomic_directory
    from qlora_trainer.models.tiny import byte_tokenizer

    out = Path(out_dir)
    dev = generator_device()
    stamp = {"arch": arch_name, "seed": seed, "generator_device": dev.type, "init_std": INIT_STD}
    stamp_file = out / "bench_weights.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    cfg = hf_config(arch_name)
    skeleton = _meta_model(cfg, torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()
              if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    shards: dict[str, list[str]] = {}
    for k in shapes:
        shards.setdefault(_shard_of(k), []).append(k)
    with atomic_directory(out) as tmp:
        cfg.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)  # Unsloth's from_pretrained loads a tokenizer too
        weight_map = {}
        for i, (shard, names) in enumerate(sorted(shards.items())):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: tensor_for(k, shapes[k], seed=seed, device=dev).cpu() for k in names}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in names})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "bench_weights.json").write_text(json.dumps(stamp))
    return out


def build_nf4_in_process(arch_name: str, *, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The same tensors as :func:`write_checkpoint`, materialized on ``device``: every linear layer
    but ``lm_head`` becomes an NF4 (double-quant) ``Linear4bit`` computing in ``dtype``; embeddings,
    norms and ``lm_head`` are ``dtype``. Peak memory: the NF4 model plus one 16-bit tensor."""
    from qlora_trainer.models.quantize import quantize_linear

    cfg = hf_config(arch_name)
    model = _meta_model(cfg, dtype)
    gen_dev = generator_device()
    for mod_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{mod_name}.{child_name}" if mod_name else child_name
            if type(child) is nn.Linear and full != "lm_head":
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = nn.Parameter(tensor_for(f"{full}.weight", tuple(child.weight.shape), seed=seed,
                                                     device=gen_dev).to(device, dtype), requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(torch.zeros(child.out_features, device=device, dtype=dtype),
                                            requires_grad=False)
                setattr(module, child_name, quantize_linear(lin, compute_dtype=dtype, device=device))
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            owner, _, leaf = name.rpartition(".")
            value = tensor_for(name, tuple(p.shape), seed=seed, device=gen_dev).to(device, dtype)
            model.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.weights", description=write_checkpoint.__doc__)
    ap.add_argument("arch")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_checkpoint(a.arch, a.out_dir, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
