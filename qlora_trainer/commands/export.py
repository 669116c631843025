"""``qlora-trainer export``: an adapter (or a merged model directory) for llama.cpp, Ollama or vLLM.

- ``--to gguf``: the merged model as one GGUF file (f32 / f16 / bf16 / q8_0), tokenizer and chat
  template inside; k-quants (q4_k_m, ...) are llama.cpp's ``llama-quantize`` from that file (the
  command is printed).
- ``--to gguf-adapter``: the adapter alone as llama.cpp's ``--lora`` GGUF (megabytes).
- ``--to ollama``: a directory with the merged GGUF and a ``Modelfile`` (``ollama create``).
- ``--to vllm``: a directory with ``merged/`` (16-bit HF model, generation config, chat template) and,
  from an adapter, ``lora/`` for ``--enable-lora --lora-modules``.

An adapter is merged exactly as ``merge`` does it (the dequantized base plus s·B·A, in fp32), then
encoded. Every file is written aside and renamed into place; the output may not overlap the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from qlora_trainer.errors import QloraError
from qlora_trainer.export.chat import end_of_turn, resolve_template
from qlora_trainer.export.gguf_adapter import write_adapter_gguf
from qlora_trainer.export.gguf_file import KQUANTS, OUTTYPES, is_gguf, quantize_command
from qlora_trainer.export.gguf_model import write_model_gguf
from qlora_trainer.export.ollama import modelfile
from qlora_trainer.export.vllm import write_vllm_adapter, write_vllm_model
from qlora_trainer.io import atomic_directory, check_output, check_output_file, mark_output
from qlora_trainer.lora import merge_lora
from qlora_trainer.lora.loading import load_with_adapters, run_config_for
from qlora_trainer.lora.peft_format import CONFIG_NAME, read_adapter
from qlora_trainer.models.catalog import get_arch
from qlora_trainer.models.load import RANDOM_PREFIX
from qlora_trainer.runtime import expand_path

HELP = "export an adapter or merged model to GGUF (llama.cpp), a GGUF LoRA adapter, Ollama or vLLM"

TARGETS = ("gguf", "gguf-adapter", "ollama", "vllm")
FILE_TARGETS = ("gguf", "gguf-adapter")  # one .gguf file; the others write a directory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="ADAPTER_OR_MERGED",
                   help="adapter directory (PEFT format) or merged model directory")
    p.add_argument("--to", required=True, choices=TARGETS, help="what to write")
    p.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="a .gguf file (gguf, gguf-adapter) or a directory (ollama, vllm)")
    p.add_argument("--outtype", default=None, choices=OUTTYPES + KQUANTS,
                   help="GGUF encoding (default: f16 for models, f32 for adapters); k-quants print the "
                        "llama-quantize command that makes them from an f16 file")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="--to vllm: the merged weights' dtype")
    p.add_argument("--base", default=None, metavar="MODEL", help="base model (default: from the adapter's config)")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="chat template to ship: chatml, llama-2, llama-3, mistral (default: the run's data."
                        "chat_template, else the tokenizer's own)")
    p.add_argument("--tokenizer-model", default=None, metavar="FILE",
                   help="SentencePiece tokenizer.model for GGUF (default: found beside the tokenizer files)")
    p.add_argument("--system", default=None, help="--to ollama: a SYSTEM prompt for the Modelfile")
    p.add_argument("--num-ctx", type=int, default=None,
                   help="--to ollama: context length (default: min(model's, 4096))")
    p.add_argument("--name", default=None, help="model name written into the GGUF (default: the output's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key of the adapter, e.g. model.revision=main")


def check_paths(source: Path, out: Path, overwrite: bool, to: str) -> None:
    """The output may not be, hold, or sit inside the input. A directory output (ollama, vllm) is
    replaced only if an earlier export wrote it (``io.check_output``); a ``.gguf`` file only with
    ``--overwrite`` and only if it is a GGUF file, never another file of the user's
    (``io.check_output_file``)."""
    if to in FILE_TARGETS:
        check_output_file(out, [source], overwrite=overwrite, ours=is_gguf, what="a GGUF file")
    else:
        check_output(out, [source], overwrite=overwrite)


def is_adapter(source: Path) -> bool:
    if (source / CONFIG_NAME).is_file():
        return True
    if (source / "config.json").is_file():
        return False
    raise QloraError(f"{source}: neither an adapter directory (adapter_config.json) nor a model directory "
                     f"(config.json)")


def run(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.output)
    if not source.is_dir():
        raise QloraError(f"{source}: not a directory")
    check_paths(source, out, args.overwrite, args.to)
    adapter = is_adapter(source)
    outtype = args.outtype or ("f32" if args.to == "gguf-adapter" else "f16")
    if outtype in KQUANTS:
        raise QloraError(f"--outtype {outtype}: k-quants need llama.cpp's quantizer; export --outtype f16, then run "
                         f"llama-quantize FILE-f16.gguf FILE-{outtype}.gguf {outtype.upper()}")
    if args.to in FILE_TARGETS and out.suffix != ".gguf":
        raise QloraError(f"--output: {out} should be a .gguf file for --to {args.to}")
    if args.to == "gguf-adapter":
        if not adapter:
            raise QloraError(f"{source}: --to gguf-adapter needs an adapter directory, not a merged model")
        return _gguf_adapter(args, source, out, outtype)
    model, tokenizer, template_choice, tok_dirs = _merged(args, source, adapter)

    template, name = resolve_template(tokenizer, args.chat_template or template_choice)
    eot = end_of_turn(name)
    if args.to == "vllm":
        return _vllm(args, source, out, adapter, model, tokenizer, template, eot)
    spm = _sentencepiece_model(args, tok_dirs)
    if args.to == "gguf":
        _write_gguf(model, tokenizer, out, outtype, template, eot, spm, args.name)
        print(f"wrote {out} ({outtype}, {model.config.architectures or type(model).__name__})")
        import shutil

        found = shutil.which("llama-quantize")
        print(f"lower-bit k-quants need llama.cpp's llama-quantize ({'found: ' + found if found else 'not on PATH'}):")
        print(f"  {quantize_command(out, outtype, 'q4_k_m')}")
        return 0
    return _ollama(args, out, model, tokenizer, outtype, template, name, eot, spm)


def _merged(args: argparse.Namespace, source: Path, adapter: bool) -> tuple[Any, Any, str | None, list[Path]]:
    """(dense fp32 model, tokenizer, the run's chat template setting, directories to look for tokenizer.model)."""
    import torch

    if not adapter:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(str(source)), None, [source]

    loaded = load_with_adapters([source], base=args.base, overrides=args.overrides, device="cpu")
    merge_lora(loaded.model, dtype=torch.float32)
    model_cfg = loaded.config.model
    dirs = [source] + [Path(p) for p in (model_cfg.tokenizer, model_cfg.name_or_path) if p and Path(p).is_dir()]
    return loaded.model, loaded.tokenizer, loaded.config.data.chat_template, dirs


def _sentencepiece_model(args: argparse.Namespace, dirs: list[Path]) -> Path | None:
    if args.tokenizer_model:
        return Path(args.tokenizer_model)
    return next((d / "tokenizer.model" for d in dirs if (d / "tokenizer.model").is_file()), None)


def _write_gguf(model, tokenizer, out: Path, outtype: str, template, eot, spm, name) -> None:
    write_model_gguf(model, tokenizer, out, outtype=outtype, chat_template=template, eot=eot,
                     sentencepiece_model=spm, name=name)


def _gguf_adapter(args: argparse.Namespace, source: Path, out: Path, outtype: str) -> int:
    cfg = run_config_for(source, base=args.base, overrides=args.overrides)
    weights = read_adapter(source)
    write_adapter_gguf(weights, base_hf_config(cfg.model), out, outtype=outtype, name=args.name)
    print(f"wrote {out} (LoRA, {len(weights.layers)} layers, {outtype}) for a GGUF of {cfg.model.name_or_path}")
    print(f"  llama-cli -m BASE.gguf --lora {out}")
    return 0


def base_hf_config(model_cfg: Any) -> Any:
    """The transformers config of the run's base model (read, not loaded)."""

    name = model_cfg.name_or_path
    if name.startswith(RANDOM_PREFIX):

        return get_arch(name[len(RANDOM_PREFIX):]).to_hf_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(expand_path(name), revision=model_cfg.revision, trust_remote_code=False)


def _ollama(args, out: Path, model, tokenizer, outtype: str, template, name, eot, spm) -> int:
    gguf_name = f"model-{outtype}.gguf"
    num_ctx = args.num_ctx or min(int(model.config.max_position_embeddings), 4096)
    text = modelfile(gguf_name, name, num_ctx=num_ctx, system=args.system)  # refuses before the GGUF is written
    with atomic_directory(out) as tmp:
        _write_gguf(model, tokenizer, tmp / gguf_name, outtype, template, eot, spm, args.name or out.name)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        mark_output(tmp, "export")
    print(f"wrote {out}/Modelfile and {out}/{gguf_name} ({name} template)")
    print(f"  cd {out} && ollama create {args.name or out.name} -f Modelfile")
    return 0


def _vllm(args, source: Path, out: Path, adapter: bool, model, tokenizer, template, eot) -> int:
    import torch

    with atomic_directory(out) as tmp:
        write_vllm_model(model, tokenizer, tmp / "merged", chat_template=template, eot=eot,
                         dtype=getattr(torch, args.dtype))
        rank = None
        if adapter:
            try:
                _, rank = write_vllm_adapter(source, tmp / "lora")
            except QloraError as e:  # the merged model still serves; say why there is no lora/
                print(f"no lora/: {e}")
                adapter = False
        mark_output(tmp, "export")
    print(f"wrote {out}/merged ({args.dtype})" + (f" and {out}/lora (PEFT LoRA, rank {rank})" if adapter else ""))
    print(f"  vllm serve {out}/merged")
    if adapter:
        print(f"  vllm serve BASE --enable-lora --lora-modules NAME={out}/lora --max-lora-rank {max(16, rank)}")
    return 0
