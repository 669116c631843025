"""``qlora-trainer doctor [CONFIG]``: versions, CUDA, bitsandbytes backend and CPU features, Triton,
the ``kernels`` name and (given a config) the memory verdict. Exit 1 when something will break a run."""

from __future__ import annotations

import argparse

from qlora_trainer.config import load_config
from qlora_trainer.doctor import report, run_checks

HELP = "report the environment (versions, CUDA, bitsandbytes, CPU features, Triton); exit 1 on a problem"
_MARK = {"ok": "ok  ", "warn": "warn", "error": "FAIL"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG", help="run config (YAML): adds the memory verdict")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.seq_len=2048")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--kernels", action="store_true",
                   help="also check every Triton kernel against its torch reference on this GPU (seconds)")


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    # bitsandbytes' CPU backend logs a warning at import when Hugging Face's `kernels` package is absent
    # (it would fetch a gemm kernel from the hub); doctor reports that name itself
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    cfg = None
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    checks = run_checks(cfg, kernels=args.kernels)
    rep = report(checks)
    if args.json:
        print(json.dumps(rep))
    else:
        for c in checks:
            print(f"[{_MARK[c.status]}] {c.name}: {c.detail}")
        cpu = rep["cpu"]
        print(f"cpu: {cpu['machine']}, torch capability {cpu['torch_cpu_capability']}, "
              f"avx512f={cpu['avx512f']}, avx512_bf16={cpu['avx512_bf16']}")
        bad = [c.name for c in checks if c.status == "error"]
        print("ok: nothing here breaks a run" if not bad else f"problems that break a run: {', '.join(bad)}")
    return 0 if rep["ok"] else 1
