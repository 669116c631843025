"""``qlora-trainer data-check CONFIG [overrides] [--json]``: lint a dataset before training on it."""

from __future__ import annotations

import argparse

from qlora_trainer.config import load_config
from qlora_trainer.data.check import check_data, format_report
from qlora_trainer.models.load import load_tokenizer

HELP = "Check a config's dataset: counts, token lengths, truncation, masking, duplicates."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.seq_len=1024")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    logging.getLogger("qlora_trainer.data").setLevel(logging.ERROR)  # the report carries the counts
    cfg = load_config(args.config, args.overrides)
    report = check_data(cfg, _tokenizer(cfg), seed=cfg.train.seed)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _tokenizer(cfg):
    """The trainer's tokenizer loader, so data-check sees exactly what training sees."""
    return load_tokenizer(cfg.model)
