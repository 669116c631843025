"""``qlora-trainer generate``: complete prompts with the base model and one or more adapters.

With several ``--adapter`` directories the base is loaded once and each prompt is answered by every
adapter in turn, so their outputs can be compared: each adapter is hot-swapped into one rank-padded
slot, in place (no module is re-created; ``--no-hotswap`` loads them side by side and switches).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora_trainer.errors import QloraError
from qlora_trainer.evaluate.generation import GenerationSettings, format_prompt, generate_batch
from qlora_trainer.io import atomic_write_text, check_output_file
from qlora_trainer.lora import disable_adapters
from qlora_trainer.lora.loading import load_with_adapters

HELP = "generate text with the base model plus LoRA adapter(s), comparing several side by side"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="adapter directory (PEFT format); repeat to compare several on the same prompts")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model (default: from the adapter's config.yaml / adapter_config.json)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="prompts, one per line (.txt) or a 'prompt' field per line (.jsonl)")
    p.add_argument("--template", choices=["auto", "raw"], default="auto",
                   help="auto: wrap prompts as the adapter was trained (instruction template / chat template); "
                        "raw: feed them as given")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-base", action="store_true", help="also answer with the adapters disabled")
    p.add_argument("--no-hotswap", dest="hotswap", action="store_false",
                   help="load the adapters side by side (memory per adapter) instead of swapping them into one slot")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the run config's)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="also write {prompt, adapter, completion} records here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (only one that generate wrote)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. model.quantization=none")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise QloraError(f"--prompts-file: {path} does not exist")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise QloraError(f"{path}:{i}: expected a JSON object with a 'prompt' field") from None
            else:
                prompts.append(line)
    if not prompts:
        raise QloraError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def settings_from_args(args: argparse.Namespace):
    """The decoding settings of ``--max-new-tokens/--sample/--temperature/--top-p/--seed``."""
    return GenerationSettings(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, batch_size=1)


RECORD_KEYS = ("prompt", "adapter", "completion")


def is_records(path: Path) -> bool:
    """Whether ``path`` is a records file of ours (``--overwrite`` may replace it): its first line is a
    JSON object with exactly the fields generate writes."""
    with open(path, "rb") as f:
        first = f.readline(1 << 24)
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and sorted(record) == sorted(RECORD_KEYS)


def check_records_output(args: argparse.Namespace) -> None:
    """Refuse, before loading, an ``--output`` over an input (prompts file, adapters, a local base) or
    over an existing file that is not an earlier output of generate (without ``--overwrite``: any)."""
    if args.output is None:
        return
    inputs = [*args.adapter, *([args.prompts_file] if args.prompts_file else [])]
    inputs += [args.base] if args.base and Path(args.base).exists() else []
    check_output_file(Path(args.output), inputs, overwrite=args.overwrite, ours=is_records,
                      what="a records file of generate (JSON lines of prompt, adapter, completion)")


def run(args: argparse.Namespace) -> int:
    if not args.adapter and not args.base:
        raise QloraError("generate: pass --adapter DIR (repeatable) and/or --base MODEL")
    if args.max_new_tokens < 1:
        raise QloraError(f"--max-new-tokens: must be >= 1 (got {args.max_new_tokens})")
    prompts = read_prompts(args)
    check_records_output(args)
    loaded = load_with_adapters(args.adapter, base=args.base, overrides=args.overrides, device=args.device,
                                hotswap=args.hotswap)
    model, tok = loaded.model, loaded.tokenizer
    settings = settings_from_args(args)
    runs: list[str | None] = ([None] if args.with_base or not loaded.names else []) + list(loaded.names)
    records = []
    for i, prompt in enumerate(prompts, 1):
        text = format_prompt(prompt, loaded.config, tok, args.template)
        print(f"=== prompt {i} ===\n{prompt}")
        for name in runs:
            if name is None:
                with disable_adapters(model):
                    completion = generate_batch(model, tok, [text], settings)[0].text
            else:
                loaded.activate(name)
                completion = generate_batch(model, tok, [text], settings)[0].text
            print(f"--- {name or 'base'} ---\n{completion}")
            records.append({"prompt": prompt, "adapter": name or "base", "completion": completion})
    if args.output:
        atomic_write_text(Path(args.output), "".join(json.dumps(r) + "\n" for r in records))
    return 0
