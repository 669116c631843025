"""One DPO step's peak memory on the CPU: ours against TRL's DPOTrainer + PEFT + bitsandbytes.

Same random Llama (2 layers, hidden 256, Llama-2's 32k vocabulary so the logits matter), same LoRA
(r 16 on every linear layer), same batch (2 pairs, 512 tokens per side), NF4 base, fp32 compute,
gradient checkpointing. Each side runs in its own process; the peak resident set (``VmHWM``) is
reset just before the step (``/proc/self/clear_refs``) and read after its backward, so model
loading is not counted. Run: ``python -m benchmarks.dpo_memory_cpu`` (writes
``benchmarks/results/dpo_memory_cpu.json``). Not a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PAIRS, PROMPT, ANSWER, R = 2, 256, 256, 16


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model_dir(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "model"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
        LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _pairs():
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(PAIRS):
        p = torch.randint(100, 32000, (PROMPT,), generator=g).tolist()
        rows.append((p, torch.randint(100, 32000, (ANSWER,), generator=g).tolist(),
                     torch.randint(100, 32000, (ANSWER,), generator=g).tolist()))
    return rows


def ours(model_dir: Path) -> dict:
    import torch

    from qlora_trainer.config import config_from_dict
    from qlora_trainer.data.preference import pair_collate
    from qlora_trainer.models.load import load_base_model
    from qlora_trainer.train.objectives import DPO
    from qlora_trainer.train.setup import prepare_model

    cfg = config_from_dict({"model": {"name_or_path": str(model_dir), "quantization": "nf4"},
                            "performance": {"gradient_checkpointing": True},
                            "lora": {"r": R, "alpha": 2 * R, "dropout": 0.0},
                            "train": {"device": "cpu"}}).validate()
    model = load_base_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    model = prepare_model(model, cfg, device=torch.device("cpu"), dtype=torch.float32)
    samples = [{"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c,
                "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r} for p, c, r in _pairs()]
    batch = pair_collate(samples, pad_id=0)
    before = _rss_mb()
    _reset_peak()
    terms, _ = DPO(beta=0.1).loss(model, batch)
    (terms["pairs"] / PAIRS).backward()
    return {"system": "ours", "loss": float(terms["pairs"].detach() / PAIRS), "rss_before_mb": before, "peak_mb": _peak_mb()}


def trl(model_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from qlora_trainer.runtime import data_root

    tok = AutoTokenizer.from_pretrained(data_root() / "llama2-tokenizer")
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    rows = [{"prompt": tok.decode(p), "chosen": tok.decode(c), "rejected": tok.decode(r)} for p, c, r in _pairs()]
    args = DPOConfig(output_dir=str(model_dir.parent / "trl-out"), per_device_train_batch_size=PAIRS,
                     max_length=PROMPT + ANSWER, gradient_checkpointing=True, use_cpu=True, report_to=[],
                     beta=0.1, bf16=False, fp16=False)
    peft = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    before = _rss_mb()
    _reset_peak()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return {"system": "trl", "loss": float(loss.detach()), "rss_before_mb": before, "peak_mb": _peak_mb(),
            "tokens": int(batch["attention_mask"].sum())}


def main() -> None:
    root = Path("/tmp/qlora-dpo-memory")
    if len(sys.argv) > 1:  # a child: one system
        print(json.dumps({"ours": ours, "trl": trl}[sys.argv[1]](_model_dir(root))))
        return
    _model_dir(root)
    results = []
    for system in ("ours", "trl"):
        p = subprocess.run([sys.executable, "-m", "benchmarks.dpo_memory_cpu", system], capture_output=True,
                           text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise SystemExit(f"{system} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    o, t = results
    summary = {"model": "random Llama, 2 layers, hidden 256, vocab 32000, NF4 base, fp32 compute",
               "batch": f"{PAIRS} pairs, {PROMPT}-token prompt + {ANSWER}-token answers", "lora_r": R,
               "results": results,
               "step_peak_over_rss_mb": {r["system"]: round(r["peak_mb"] - r["rss_before_mb"], 1) for r in results},
               "ratio_trl_over_ours": round((t["peak_mb"] - t["rss_before_mb"]) /
                                            max(o["peak_mb"] - o["rss_before_mb"], 1e-9), 2)}
    out = Path(__file__).parent / "results" / "dpo_memory_cpu.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
