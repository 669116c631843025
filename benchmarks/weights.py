"""Seed-determined random weights, identical for every benchmarked system.

Each tensor is :func:`qlora_trainer.models.synthetic.tensor_for` (seed, tensor name, generator
device): N(0, 0.02) rounded to bf16 for matrices and embeddings, ones for norms. Two ways to get
them into a model, both giving the same tensors:

* :func:`write_checkpoint` writes a bf16 safetensors checkpoint (one shard per decoder layer) plus
  config and the byte tokenizer, loadable by ``from_pretrained`` (HF stack), Unsloth and ours.
* :func:`build_nf4_in_process` (:func:`~qlora_trainer.models.synthetic.synthetic_nf4_model`) builds
  the model on the meta device and materializes it tensor by tensor on the GPU, quantizing each
  linear layer to NF4 as it goes, so a 70B model never exists in 16 bits (its 140 GB checkpoint
  would not fit the GPU machine's disk).

CLI (used by the runner, in its own process): ``python -m benchmarks.weights ARCH DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from qlora_trainer.models.synthetic import INIT_STD, generator_device, meta_skeleton, synthetic_nf4_model, tensor_for

BYTE_SPECIAL_IDS = (257, 258, 259)  # bos, eos, pad of qlora_trainer.models.tiny.byte_tokenizer


def hf_config(arch_name: str):
    """transformers config of the catalog arch, with bf16 dtype and the byte tokenizer's special ids."""
    from qlora_trainer.models.catalog import get_arch

    cfg = get_arch(arch_name).to_hf_config()
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BYTE_SPECIAL_IDS
    cfg.dtype = "bfloat16"
    return cfg


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
    skeleton = meta_skeleton(cfg, torch.bfloat16)
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
    but ``lm_head`` an NF4 (double-quant) ``Linear4bit`` computing in ``dtype``; embeddings, norms and
    ``lm_head`` in ``dtype``; config token ids those of the checkpoint (the byte tokenizer's)."""
    model = synthetic_nf4_model(arch_name, device=device, compute_dtype=dtype, seed=seed)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = BYTE_SPECIAL_IDS
    return model


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
