"""``qlora-trainer combine``: several trained adapters -> one PEFT adapter (or one dense model).

The methods are PEFT's ``add_weighted_adapter`` ones (see ``qlora_trainer.lora.combine``); the
adapters are read from disk without loading the base, unless ``--merge-into`` asks for a dense
model. The first adapter's ``config.yaml`` and tokenizer files are copied to the result, so
``generate``/``merge`` rebuild the same base from it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qlora_trainer.commands.merge import merge_and_save
from qlora_trainer.lora.combine import METHODS, SIGN_METHODS, combine_adapters
from qlora_trainer.lora.loading import load_with_adapters
from qlora_trainer.lora.peft_format import read_adapter, weights_state_dict, write_adapter_dir
from qlora_trainer.io import check_output
from qlora_trainer.lora.loading import local_bases

HELP = "combine LoRA adapters (linear, cat, svd, ties, dare, magnitude_prune) into one adapter or a merged model"

COPIED = ("config.yaml", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="adapter directories (PEFT format)")
    p.add_argument("--method", choices=METHODS, default="cat",
                   help="cat (default): exact, ranks add up; linear/ties/dare_*/magnitude_prune: equal ranks, "
                        "factor by factor; svd and *_svd: truncated SVD of the combined update")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per adapter (default: 1 each); negative subtracts")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of entries kept by ties, dare_* and magnitude_prune (0 < d <= 1)")
    p.add_argument("--majority-sign", choices=SIGN_METHODS, default="total", help="TIES sign election")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of an svd result (default: the largest input rank)")
    p.add_argument("--svd-clamp", type=float, default=None, metavar="Q",
                   help="clamp the SVD factors at this quantile of their values (default: no clamping)")
    p.add_argument("--seed", type=int, default=0, help="seed of dare's random pruning")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where the adapter (or merged model) goes")
    p.add_argument("--merge-into", default=None, metavar="BASE",
                   help="write a dense 16-bit model of BASE with the combined adapter merged, instead of an adapter")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="with --merge-into: the merged weights' dtype")
    p.add_argument("--device", default=None, help="with --merge-into: auto, cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory an earlier merge/combine wrote (never anything else)")


def run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.output)
    bases = local_bases([], args.merge_into) if args.merge_into else []
    check_output(out, [*args.adapters, *bases], overwrite=args.overwrite)
    adapters = [read_adapter(d) for d in args.adapters]
    weights = args.weights if args.weights is not None else [1.0] * len(adapters)
    generator = torch.Generator().manual_seed(args.seed)
    combined = combine_adapters(adapters, weights, args.method, density=args.density,
                                majority_sign=args.majority_sign, svd_rank=args.svd_rank,
                                svd_clamp=args.svd_clamp, generator=generator)
    ranks = sorted({lw.r for lw in combined.layers.values()})
    summary = (f"{args.method} of {', '.join(args.adapters)} (weights {', '.join(f'{w:g}' for w in weights)}): "
               f"{len(combined.layers)} layers, rank {'/'.join(map(str, ranks))}")
    copy = [Path(args.adapters[0]) / f for f in COPIED if (Path(args.adapters[0]) / f).is_file()]
    if args.merge_into is None:
        write_combined(combined, out, copy, replace=args.overwrite)
        print(f"{summary} -> {out}")
        return 0

    with tempfile.TemporaryDirectory(prefix=".combined.") as tmp:
        adapter_dir = Path(tmp) / "combined"
        write_combined(combined, adapter_dir, copy)
        loaded = load_with_adapters([adapter_dir], base=args.merge_into, device=args.device)
        print(summary)
        merge_and_save(loaded, out, dtype=args.dtype, command="combine")
    return 0


def write_combined(combined, out: Path, copy: list[Path], *, replace: bool = False) -> Path:
    """Write ``combined`` (``AdapterWeights``) as a PEFT adapter directory, ``copy`` files alongside."""
    # --overwrite swaps in the whole new directory: the old adapter's other files must not linger
    return write_adapter_dir(out, combined.config, weights_state_dict(combined), copy_files=copy, replace=replace,
                             marker="combine")
