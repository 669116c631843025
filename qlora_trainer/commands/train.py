"""``qlora-trainer train CONFIG [section.key=value ...]``: fine-tune a LoRA adapter on a 4-bit base."""

from __future__ import annotations

import argparse
import os

from qlora_trainer.config import UNADVERTISED, field_docs, load_config
from qlora_trainer.errors import ConfigError
from qlora_trainer.train import train

HELP = "train a LoRA adapter on an NF4 base model from a YAML config (+ section.key=value overrides)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.max_steps=10 output_dir=outputs/x")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its documentation")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the summary")


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        for key, doc in field_docs().items():
            if key not in UNADVERTISED:
                print(f"{key}\n    {doc}")
        return 0
    if args.config is None:
        raise ConfigError("train: give a config file, e.g. qlora-trainer train configs/demo.yaml")
    cfg = load_config(args.config, args.overrides)  # config errors before any heavy import

    import logging

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: rank 0 reports for the run
        return 0
    if result.already_complete:
        print(f"the run in {result.output_dir} is already complete (step {result.step}); raise train.max_steps or "
              f"train.epochs to continue it")
        return 0
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        print(f"loss {first:.4f} -> {last:.4f} over steps {result.step - len(result.losses) + 1}..{result.step} "
              f"({result.tokens:,} loss tokens, {result.seconds:.1f} s)")
    if result.eval_loss is not None:
        print(f"eval loss {result.eval_loss:.4f}")
    print(f"metrics in {result.output_dir / 'metrics.jsonl'}")
    if result.adapter_dir is not None:
        print(f"adapter saved to {result.adapter_dir}")
    return 0
