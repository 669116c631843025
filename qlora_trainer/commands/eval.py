"""``qlora-trainer eval CONFIG_OR_ADAPTER``: exact-match on generation tasks and the dataset loss.

The target is an adapter directory (its ``config.yaml`` describes the base, data and template) or a
run config (its ``output_dir/adapter`` when trained, else the base model alone). ``--with-base``
scores the same loaded model with its adapter switched off as well. Writes
``predictions.jsonl`` + ``summary.json`` to ``--output`` (default ``<run>/eval``; beside an adapter
directory not named ``adapter``: ``<adapter>-eval``), never into an input (``io.check_output``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora_trainer.commands.generate import settings_from_args
from qlora_trainer.config import load_config
from qlora_trainer.errors import QloraError
from qlora_trainer.evaluate import dataset_loss, resolve_task, run_tasks, write_results
from qlora_trainer.lora import disable_adapters, set_active_adapter
from qlora_trainer.lora.loading import LoadedModel, load_with_adapters
from qlora_trainer.models.load import load_base_model, load_tokenizer
from qlora_trainer.runtime import resolve_device, resolve_dtype
from qlora_trainer.io import check_output, mark_output

HELP = "evaluate a model/adapter: exact-match on generation tasks (GSM8K, ...) and dataset loss/perplexity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CONFIG_OR_ADAPTER", help="adapter directory or run config (.yaml)")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="gsm8k, gsm8k-train or FILE.jsonl[@extractor] (repeatable; default: the config's "
                        "eval.tasks, else gsm8k)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N examples per task (default all)")
    p.add_argument("--no-tasks", action="store_true", help="skip generation tasks (loss only)")
    p.add_argument("--perplexity", action="store_true",
                   help="also the mean loss / perplexity on the run's eval data (data.eval_path / eval_fraction; "
                        "else its training data), same pipeline and masks as training")
    p.add_argument("--loss-batches", type=int, default=0, metavar="N", help="batches for --perplexity (0: all)")
    p.add_argument("--with-base", action="store_true", help="also evaluate the base model (adapter switched off)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="new tokens per answer (0: the task's default)")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per batch (0: the largest that fits memory)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=["auto", "raw"], default="auto",
                   help="auto: wrap prompts as in training (data.format/template); raw: as given")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="results directory (default: <run>/eval, or ADAPTER-eval beside an adapter directory)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the run config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. data.eval_path=data/test.jsonl")


def load_target(target: str, *, overrides: list[str], device: str | None):
    """(LoadedModel, default output dir) for an adapter directory or a run config."""
    path = Path(target)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise QloraError(f"{path}: not an adapter directory (no adapter_config.json)")
        return load_with_adapters([path], overrides=overrides, device=device), _default_output(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise QloraError(f"{path}: expected an adapter directory or a run config (.yaml)")

    cfg = load_config(path, overrides)
    adapter = Path(cfg.output_dir) / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return load_with_adapters([adapter], overrides=overrides, device=device), Path(cfg.output_dir) / "eval"
    import logging

    logging.getLogger(__name__).warning("%s: no trained adapter at %s; evaluating the base model", path, adapter)
    if device is not None:
        cfg.train.device = device
    dev = resolve_device(cfg.train.device)
    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg, device=dev, dtype=resolve_dtype(cfg.model.compute_dtype, dev), vocab_size=len(tok))
    return LoadedModel(model=model.eval(), tokenizer=tok, config=cfg), Path(cfg.output_dir) / "eval"


RESULT_FILES = ("predictions.jsonl", "summary.json")


def _default_output(adapter: Path) -> Path:
    """``<run>/eval`` for a run's ``adapter`` directory, else ``<adapter>-eval`` beside it (never inside)."""
    return adapter.parent / "eval" if adapter.name == "adapter" else adapter.parent / f"{adapter.name}-eval"


def check_eval_output(args: argparse.Namespace) -> None:
    """Refuse, before loading, an ``--output`` that overlaps the evaluated adapter or config, or holds
    result files we did not write."""

    if args.output is None:
        return
    target = Path(args.target)
    inputs = [target]
    if not target.is_dir() and target.is_file():

        inputs.append(Path(load_config(target, args.overrides).output_dir) / "adapter")
    check_output(Path(args.output), inputs, overwrite=True, files=RESULT_FILES)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    for name in ("limit", "max_new_tokens", "batch_size", "loss_batches"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise QloraError(f"--{name.replace('_', '-')}: must be >= 0 (got {value})")
    if args.no_tasks and not args.perplexity:
        raise QloraError("nothing to evaluate: --no-tasks without --perplexity")
    for s in args.task:
        resolve_task(s)  # bad specs fail before the model loads
    check_eval_output(args)
    loaded, default_out = load_target(args.target, overrides=args.overrides, device=args.device)
    cfg, model, tok = loaded.config, loaded.model, loaded.tokenizer
    specs = [] if args.no_tasks else (args.task or list(cfg.eval.tasks or []) or ["gsm8k"])
    settings = replace(settings_from_args(args), batch_size=args.batch_size)
    runs: list[str | None] = ([None] if args.with_base or not loaded.names else []) + list(loaded.names)
    results, losses = [], {}
    for name in runs:
        label = name or "base"
        if name is not None:
            set_active_adapter(model, name)
        with disable_adapters(model) if name is None else _nothing():
            results += run_tasks(model, tok, cfg, specs, settings, limit=args.limit, label=label,
                                 template=args.template, progress=not args.no_progress)
            if args.perplexity:
                losses[label] = dataset_loss(model, cfg, tok, max_batches=args.loss_batches)
    out = Path(args.output) if args.output else default_out
    if args.output is None:
        check_output(out, [args.target, *loaded.dirs], overwrite=True, files=RESULT_FILES)
    summary = {"target": str(args.target), "base": cfg.model.name_or_path, "adapters": loaded.names,
               "tasks": specs, "limit": args.limit, "settings": asdict(settings), "loss": losses}
    preds, summ = write_results(out, results, summary)
    mark_output(out, "eval")
    for r in results:
        print(f"{r.label:>12} {r.task:<16} exact-match {r.exact_match:7.2%} ({r.correct}/{r.n})  "
              f"{r.samples_per_s:.2f} samples/s  {r.tokens_per_s:.1f} tokens/s")
    for label, d in losses.items():
        print(f"{label:>12} loss {d['loss']:.4f}  perplexity {d['perplexity']:.3f}  ({d['split']} data)")
    print(f"predictions: {preds}\nsummary: {summ}")
    return 0


def _nothing():
    import contextlib

    return contextlib.nullcontext()
