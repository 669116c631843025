"""``python -m benchmarks.speed CONFIG --gpu h100``: peak memory and predicted step time of a run, ours
next to the HF stack, before anything is loaded (a model, not a measurement: docs/speed-model.md).

Our instrument for steering speed work (run from the repository root); not a user command until the model
is calibrated on GPU rows. ``qlora-trainer memory`` gives the memory verdict alone."""

from __future__ import annotations

import argparse
import sys
from qlora_trainer.config import load_config
from qlora_trainer.errors import ConfigError, QloraError
from qlora_trainer.memory.estimate import estimate, estimate_for_config, resolve_arch
from qlora_trainer.models.catalog import get_arch

HELP = "predict a run's peak memory, step time, tokens/s and wall time (ours vs the HF stack) before a GPU-day"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.speed.devices import DEVICES

    p.add_argument("config", metavar="CONFIG", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as for train")
    p.add_argument("--gpu", default="h100", help=f"GPU to predict for: {', '.join(DEVICES)} (default h100)")
    p.add_argument("--arch", metavar="NAME",
                   help="catalog shape to use (e.g. llama-3-8b) when model.name_or_path is a hub id")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="training samples in one epoch, for the epoch wall time (default: data.max_samples "
                        "when set and not packing; else not shown)")
    for name, what in (("fused-qkv", "q/k/v as one dequant + GEMM"), ("fused-gate-up", "gate/up as one"),
                       ("skip-down-recompute", "no down_proj GEMM in the recompute"),
                       ("fused-dequant-gemm", "NF4 decoded inside the GEMM at every M (built as performance.nf4_matmul=fused)"),
                       ("cuda-graphs", "the step replayed as a CUDA graph")):
        p.add_argument(f"--{name}", action="store_true", help=f"planned option, predicted only: {what}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from benchmarks.speed.devices import get_device
    from benchmarks.speed.report import hf_options, markdown, options_for_config, predict

    if args.samples < 0:
        raise ConfigError(f"--samples: must be >= 0 (got {args.samples})")
    dev = get_device(args.gpu)
    cfg = load_config(args.config, args.overrides)
    if args.arch:

        get_arch(args.arch)  # one-line error for an unknown name
        cfg.model.name_or_path = args.arch
    arch, reason = resolve_arch(cfg.model.name_or_path)
    if arch is None:
        raise ConfigError(f"{args.config}: model.name_or_path: {reason} (or pass --arch NAME)")
    # what the config builds on this GPU (performance.checkpoint_layers planned for its memory); the flags
    # add planned optimisations
    base = options_for_config(cfg, budget_bytes=dev.memory_bytes)
    opts = replace(base, fused_qkv=base.fused_qkv or args.fused_qkv,
                   fused_gate_up=base.fused_gate_up or args.fused_gate_up,
                   skip_down_recompute=base.skip_down_recompute or args.skip_down_recompute,
                   fused_dequant_gemm=base.fused_dequant_gemm or args.fused_dequant_gemm,
                   cuda_graphs=args.cuda_graphs)
    ours, hf = predict(arch, opts, dev), predict(arch, hf_options(opts), dev)
    ck = opts.checkpointed(arch.layers)
    mem = estimate_for_config(cfg, checkpointed_layers=ck)
    hf_mem = estimate(arch, seq_len=cfg.data.seq_len, batch=cfg.train.batch_size, lora_r=cfg.lora.r,
                      targets=cfg.lora.targets, optimizer=cfg.train.optimizer, lora_dropout=cfg.lora.dropout,
                      blocksize=cfg.quantization.blocksize, double_quant=cfg.quantization.double_quant,
                      system="hf")
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    samples = args.samples or (0 if cfg.data.pack else int((cfg.data.max_samples or 0) * (1 - cfg.data.eval_fraction)))
    epoch_steps = -(-samples // per_step) if samples else None  # (--samples, else data.max_samples unpacked)
    steps = cfg.train.max_steps  # train.epochs: its steps where the data size is known, else the default 100
    if steps is None:
        steps = max(1, round(cfg.train.epochs * epoch_steps)) if epoch_steps else 100
    if args.json:
        out = {"gpu": dev.name, "model": arch.name, "max_steps": steps, "checkpointed_layers": ck,
               "memory": mem.to_dict() if mem else None, "memory_hf": hf_mem.to_dict(),
               "fits": mem.fits(dev.memory_bytes / 1e9) if mem else None,
               "ours": ours.to_dict() | {"wall_s_max_steps": round(ours.wall_seconds(steps), 1)},
               "hf": hf.to_dict() | {"wall_s_max_steps": round(hf.wall_seconds(steps), 1)},
               "predicted_speedup_vs_hf": round(hf.seconds / ours.seconds, 3), "kind": "prediction"}
        if epoch_steps:
            out["epoch_steps"] = epoch_steps
            out["ours"]["wall_s_epoch"] = round(ours.wall_seconds(epoch_steps), 1)
            out["hf"]["wall_s_epoch"] = round(hf.wall_seconds(epoch_steps), 1)
        print(json.dumps(out))
        return 0
    if mem is not None:
        verdict = "fits" if mem.fits(dev.memory_bytes / 1e9) else "does NOT fit"
        print(f"peak memory (estimate): {mem.total_gb:.2f} GB on the device, {mem.allocated_gib:.2f} GiB "
              f"allocated: {verdict} in the {dev.name}'s {dev.memory_gb:g} GB (HF stack: "
              f"{hf_mem.total_gb:.2f} GB, {hf_mem.allocated_gib:.2f} GiB allocated)")
        print(f"checkpointed layers: {ck} of {arch.layers} (performance.checkpoint_layers="
              f"{cfg.performance.checkpoint_layers}, planned for {dev.memory_gb:g} GB)\n")
    print(markdown(ours, hf, steps=steps, epoch_steps=epoch_steps))
    return 0


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
