"""``qlora-trainer memory-table``: the QLoRA paper's LLaMA memory breakdown next to our estimates."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_trainer.errors import ConfigError
from qlora_trainer.memory.estimate import GIB
from qlora_trainer.io import check_output_file
from qlora_trainer.memory.paper import CHART_MAGIC, is_chart, paper_chart, paper_markdown, paper_table
from qlora_trainer.memory.profile import CudaReader
from qlora_trainer.memory.references import PAPER_SETTINGS
from qlora_trainer.train.measure import measure_training

HELP = "reproduce the QLoRA paper's memory table (LLaMA 7B-65B) with our estimates, as markdown/JSON/chart"


CHART_TYPES = tuple(CHART_MAGIC)  # .png, .svg, .pdf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    p.add_argument("--chart", metavar="PATH", help="write a stacked-bar chart (png/svg/pdf) to PATH")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --chart (only one memory-table drew)")
    p.add_argument("--measure", action="store_true",
                   help="also measure our stack on this GPU (synthetic NF4 models; sizes that fit only)")


def run(args: argparse.Namespace) -> int:
    import json

    if args.chart and Path(args.chart).suffix.lower() not in CHART_TYPES:
        raise ConfigError(f"--chart: {args.chart!r} has no supported extension; end it in "
                          f"{', '.join(CHART_TYPES)} (e.g. --chart memory.png)")
    if args.chart:
        check_output_file(Path(args.chart), [], overwrite=args.overwrite, ours=is_chart,
                          what="a chart of memory-table", option="--chart")
    rows = paper_table()
    if args.measure:
        _measure(rows)
    if args.chart:
        paper_chart(rows, args.chart)
    if args.json:
        print(json.dumps({"rows": rows, "units": {"*_gb": "1e9 bytes", "*_gib": "2**30 bytes", "*_mb": "1e6 bytes"}}))
    else:
        print(paper_markdown(rows))
        if args.chart:
            print(f"\nchart: {args.chart}")
    return 0


def _measure(rows: list[dict]) -> None:
    """Add ``measured_ours_allocated_gib`` (peak over phases) to each row whose estimate fits the GPU."""
    import torch

    CudaReader()  # one-line error without CUDA
    capacity = torch.cuda.get_device_properties(0).total_memory / 1e9
    s = PAPER_SETTINGS
    for r in rows:
        if r["est_ours_device_gb"] > capacity:
            r["measured_ours_allocated_gib"] = None
            continue
        prof = measure_training(r["model"], seq_len=s["seq_len"], batch=s["batch"], lora_r=s["lora_r"],
                                optimizer=s["optimizer"], steps=1)
        r["measured_ours_allocated_gib"] = round(max(p.allocated for p in prof.peaks.values()) / GIB, 2)
        torch.cuda.empty_cache()
