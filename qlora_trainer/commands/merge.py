"""``qlora-trainer merge``: bake an adapter into its base for deployment.

The NF4 base is dequantized (bf16 on CUDA, fp32 on the CPU, or ``--dtype``), scale·B·A (DoRA: the
magnitude-scaled direction) is added, and an ordinary 16-bit HF model directory without
``quantization_config`` is written atomically. The largest |Δlogit| between the adapter model and the
merged model on a sample is printed as a check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_trainer.io import atomic_directory
from qlora_trainer.lora import merge_lora
from qlora_trainer.lora.loading import load_with_adapters
from qlora_trainer.runtime import resolve_dtype
from qlora_trainer.io import check_output, mark_output
from qlora_trainer.lora.loading import local_bases

HELP = "merge a LoRA adapter into its dequantized base and save a 16-bit HF model directory"

SAMPLE = "The quick brown fox jumps over the lazy dog. 1 + 2 = 3."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (PEFT format)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where the merged model goes")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model (default: from the adapter's config.yaml / adapter_config.json)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="merged weights' dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--sample", default=SAMPLE, metavar="TEXT", help="text for the |Δlogit| check")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the run config's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory an earlier merge/combine wrote (never anything else)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. model.revision=main")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_output(out, [args.adapter, *local_bases([args.adapter], args.base)], overwrite=args.overwrite)
    loaded = load_with_adapters([args.adapter], base=args.base, overrides=args.overrides, device=args.device)
    merge_and_save(loaded, out, dtype=args.dtype, sample=args.sample)
    return 0


def merge_and_save(loaded, out: Path, *, dtype: str = "auto", sample: str = SAMPLE, command: str = "merge") -> None:
    """Merge ``loaded``'s active adapter into its base, write the dense model to ``out`` (atomically)
    and print the largest |Δlogit| adapter vs merged on ``sample``."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    dtype = resolve_dtype(dtype, device)
    ids = tok(sample, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        before = model(ids).logits.float()
        merge_lora(model, dtype=dtype)
        after = model(ids).logits.float()
    delta = (before - after).abs().max().item()
    model.config.use_cache = True
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        mark_output(tmp, command)  # --overwrite may replace it later
    print(f"merged {loaded.names[0]} into {loaded.config.model.name_or_path} ({str(dtype).removeprefix('torch.')}) "
          f"-> {out}")
    print(f"max |Δlogit| adapter vs merged on the sample: {delta:.3g}")
