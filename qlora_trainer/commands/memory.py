"""``qlora-trainer memory MODEL``: will this run fit? Estimate (and optionally measure) peak GPU memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_trainer.memory.report import estimate_markdown
from qlora_trainer.errors import ConfigError
from qlora_trainer.io import check_output_file
from qlora_trainer.memory.estimate import estimate, largest_fitting, resolve_arch
from qlora_trainer.memory.profile import CudaReader, is_snapshot
from qlora_trainer.train.measure import measure_training

HELP = "estimate peak GPU memory of a QLoRA run before loading anything (exit 0 fits, 1 does not)"
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="catalog name (e.g. llama-2-7b) or a model directory with config.json")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--budget", type=float, required=True, help="GPU memory budget in GB (1e9 bytes)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank on all linear layers (default 16)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="paged_adamw_8bit")
    p.add_argument("--system", choices=("ours", "hf"), default="ours",
                   help="ours (no fp32 upcast, chunked loss) or hf (transformers+PEFT+bitsandbytes)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="store every layer's activations instead of recomputing them")
    p.add_argument("--offload", action="store_true", help="offload checkpointed activations to pinned CPU memory")
    p.add_argument("--mlp-chunk", type=int, default=0, metavar="N",
                   help="sequence-tiled MLP: N tokens per checkpointed chunk (performance.mlp_chunk_tokens; 0 = off)")
    p.add_argument("--embeddings-on-cpu", action="store_true",
                   help="keep the input embedding table in CPU memory (performance.embeddings_on_cpu)")
    p.add_argument("--dropout", type=float, default=0.05, metavar="P",
                   help="LoRA dropout probability (lora.dropout; default 0.05 as in the config); "
                        "0 leaves out the memory dropout costs (masks, dropped copies)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="GPUs the run is spread over: the estimate is per GPU (--batch is per GPU; default 1)")
    p.add_argument("--distributed", choices=("none", "ddp", "fsdp"), default=None,
                   help="train.distributed: ddp replicates the model, fsdp shards the NF4 base "
                        "(default: none on one GPU; required with --gpus > 1)")
    p.add_argument("--basis", choices=("device", "allocated"), default="device",
                   help="compare the budget with the whole device footprint (default) or the allocator peak (GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--measure", action="store_true", help="also run real steps on the GPU with a synthetic NF4 model")
    p.add_argument("--snapshot", metavar="PATH", help="with --measure: dump a CUDA memory-history snapshot here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --snapshot (only a snapshot file)")


def run(args: argparse.Namespace) -> int:
    import json
    import math

    for name in ("seq", "batch", "r"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1 (got {getattr(args, name)})")
    if not 0.0 <= args.dropout < 1.0:
        raise ConfigError(f"--dropout: must be in [0, 1) (got {args.dropout})")
    if args.mlp_chunk < 0:
        raise ConfigError(f"--mlp-chunk: must be >= 0 (got {args.mlp_chunk})")
    if not math.isfinite(args.budget) or args.budget <= 0:
        raise ConfigError(f"--budget: must be a finite number of GB > 0, e.g. --budget 24 (got {args.budget})")
    if args.gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1 (got {args.gpus})")
    if args.distributed is None:
        if args.gpus > 1:
            raise ConfigError("--distributed: say how the run uses several GPUs, --distributed ddp or fsdp")
        args.distributed = "none"
    if args.distributed == "none" and args.gpus > 1:
        raise ConfigError("--distributed none runs on one GPU; use --gpus 1, or --distributed ddp|fsdp")
    if args.measure and args.distributed != "none":
        raise ConfigError("--measure runs on one GPU; drop --gpus/--distributed")
    if args.measure and args.system != "ours":
        raise ConfigError("--measure runs our stack only; drop --system hf (HF figures: memory/references.py)")
    if args.snapshot:
        if not args.measure:
            raise ConfigError("--snapshot: records the --measure steps; add --measure (needs a CUDA GPU)")
        check_output_file(Path(args.snapshot), [], overwrite=args.overwrite, ours=is_snapshot,
                          what="a CUDA memory snapshot", option="--snapshot")
    arch, reason = resolve_arch(args.model)
    if arch is None:
        raise ConfigError(f"MODEL: {reason}")
    kw = dict(lora_r=args.r, optimizer=args.optimizer, system=args.system,
              checkpointing=args.checkpointing, offload=args.offload, mlp_chunk=args.mlp_chunk,
              lora_dropout=args.dropout, embeddings_on_cpu=args.embeddings_on_cpu, gpus=args.gpus,
              distributed=args.distributed)
    est = estimate(arch, seq_len=args.seq, batch=args.batch, **kw)
    fits = est.fits(args.budget, args.basis)
    max_seq = largest_fitting(arch, args.budget, vary="seq_len", basis=args.basis, batch=args.batch, **kw)
    max_batch = largest_fitting(arch, args.budget, vary="batch", basis=args.basis, seq_len=args.seq, **kw)
    measured = None
    if args.measure:
        CudaReader()  # one-line error without CUDA, before building anything
        measured = measure_training(arch, seq_len=args.seq, batch=args.batch, lora_r=args.r,
                                    optimizer=args.optimizer, checkpointing=args.checkpointing,
                                    offload=args.offload, lora_dropout=args.dropout,
                                    embeddings_on_cpu=args.embeddings_on_cpu, snapshot=args.snapshot)
    if args.json:
        out = est.to_dict() | {"fits": fits, "budget_gb": args.budget, "basis": args.basis,
                               "max_seq_len": max_seq, "max_batch": max_batch}
        if measured is not None:
            out["measured"] = measured.compare(est)
        print(json.dumps(out))
    else:
        print(estimate_markdown(est))
        verdict = "fits" if fits else "does NOT fit"
        per = f" per GPU ({args.gpus} GPUs, {args.distributed})" if args.distributed != "none" else ""
        print(f"\n{verdict} in {args.budget:g} GB{per} ({args.basis} basis); at batch {args.batch} the longest "
              f"sequence that fits is {max_seq} tokens; at seq {args.seq} the largest batch is {max_batch}.")
        if measured is not None:
            print("\n" + measured.to_markdown(est))
    return 0 if fits else 1
