"""Typed run configuration: dataclasses with documented fields, YAML + ``section.key=value`` overrides.

A config file is YAML with the sections below (each optional) plus the top-level keys
``output_dir`` and ``resume``::
    model:        {name_or_path: random:tiny, quantization: nf4}
    quantization: {double_quant: true, quant_storage: uint8}
    lora:         {r: 16, alpha: 32, dropout: 0.05, targets: all-linear}
    data:         {path: ..., format: instruction, seq_len: 512}
    train:        {max_steps: 100, lr: 2.0e-4, batch_size: 1, grad_accum: 16}
    output:       {log_every: 1, keep_last: 2}
    output_dir:   outputs/run

Every field's comment is its documentation (``qlora-trainer train --help-config`` prints them).
Unknown keys and bad values raise :class:`ConfigError` with a one-line message that names the key
(and the file) and, for a misspelling, the nearest valid name. Each section validates itself
(:meth:`Section.validate`): its fields against the allowed values it lists next to them (``RULES``,
rules from :mod:`qlora_trainer.config_rules`, also shown by ``--help-config``) and the rules between its
own fields; :meth:`Config.validate` adds the rules across sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from qlora_trainer.errors import ConfigError
from qlora_trainer.config_rules import (AT_LEAST_0, AT_LEAST_1, FRACTION, NONEMPTY, POSITIVE, OneOf, Pattern, Range,
                                         WordOrRange, coerce, describe, problem)
from qlora_trainer.io import atomic_write_text
from qlora_trainer.io import read_text

# --------------------------------------------------------------------------------------------------
# sections


class Section:
    """A config section: dataclass fields, the allowed values of each (``RULES``: field -> rule) and
    :meth:`check`, the rules between its own fields."""

    RULES: ClassVar[dict[str, Any]] = {}

    def validate(self, prefix: str = "") -> Any:
        """Check every field against its rule (nested sections in turn), then :meth:`check`; raise a
        one-line ConfigError naming the key (``prefix``: this section's place, e.g. ``"lora."``)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate(f"{prefix}{f.name}.")
                continue
            msg = problem(self.RULES.get(f.name), value)  # floats finite and lists non-empty, ruled or not
            if msg:
                raise ConfigError(f"{prefix}{f.name}: {msg} (got {value!r})")
        self.check()
        return self

    def check(self) -> None:
        """Rules between this section's own fields (none by default)."""


@dataclass
class ModelConfig(Section):
    name_or_path: str = "random:tiny"
    """HF hub id, a local model directory, or ``random:<arch>`` to build a randomly initialised model
    in-process from the architecture catalog (``random:tiny`` is the demo's model; no download)."""
    quantization: Literal["nf4", "none"] = "nf4"
    """``nf4``: 4-bit NormalFloat base through bitsandbytes (QLoRA). ``none``: 16-bit base (plain LoRA)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Matmul/activation dtype. ``auto`` = bfloat16 on CUDA, float32 on CPU (see runtime.py)."""
    tokenizer: str | None = None
    """Tokenizer path or hub id; defaults to ``name_or_path`` (``random:*`` models use the built-in byte tokenizer)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off by default; turn on only for repositories you trust."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = "auto"
    """Attention backend passed to transformers. ``auto``: what the model's class supports (sdpa;
    eager for logit soft-capping (Gemma 2); flash_attention_2 on CUDA when flash-attn is installed),
    stated in the start-up log."""
    resize_embeddings: bool = False
    """Add a new pad token and resize the embeddings when the tokenizer has none (default: reuse EOS/UNK)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "name_or_path": NONEMPTY,
        "tokenizer": NONEMPTY,
    }


@dataclass
class QuantizationConfig(Section):
    double_quant: bool = True
    """Quantize the per-block absmax constants again (8-bit, blocks of 256): ~0.5 -> ~0.127 bit/param."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of bitsandbytes; NF4 is information-theoretically optimal for normal weights."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of the packed 4-bit weights (bfloat16 lets FSDP shard them with the 16-bit parts)."""
    blocksize: int = 64
    """Weights per absmax block of the first quantization level."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "blocksize": OneOf((64, 128, 256, 512, 1024, 2048, 4096)),
    }


@dataclass
class AdaLoRAConfig(Section):
    """AdaLoRA's rank allocation (``lora.variant: adalora``): YAML ``lora: {adalora: {target_r: 4}}``."""

    target_r: int = 4
    """AdaLoRA: average rank per layer at the end (the total budget is this times the layers; ``lora.r``
    is the initial rank)."""
    tinit: int = 0
    """AdaLoRA: steps of warm-up before any pruning."""
    tfinal: int = 0
    """AdaLoRA: last steps with the final ranks fixed (the budget falls cubically in between)."""
    delta_t: int = 1
    """AdaLoRA: prune every this many steps during the budget phase."""
    beta1: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity |p * grad| (smoothing)."""
    beta2: float = 0.85
    """AdaLoRA: EMA factor of the sensitivity's uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality penalty mean ||P P^T - I||_F on A and B^T."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "target_r": AT_LEAST_1,
        "tinit": AT_LEAST_0,
        "tfinal": AT_LEAST_0,
        "delta_t": AT_LEAST_1,
        "beta1": Range(0, 1, lo_open=True, hi_open=True),
        "beta2": Range(0, 1, lo_open=True, hi_open=True),
        "orth_reg_weight": AT_LEAST_0,
    }


@dataclass
class LoRAConfig(Section):
    r: int = 16
    """Adapter rank. 16 on every linear layer matches r=64 on attention alone in the QLoRA paper's
    ablations at a quarter of the adapter memory."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rsLoRA). alpha = 2r keeps
    the effective learning rate stable when r changes."""
    dropout: float = 0.05
    """Dropout on the adapter input. 0.05 is the QLoRA paper's value for 7B-13B models."""
    targets: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer except ``lm_head``) or module-name patterns (regex or suffix
    such as ``q_proj``)."""
    target_experts: bool = True
    """Mixture-of-experts models (Mixtral, Qwen3-MoE, ...): also adapt the fused expert weights
    (``experts.gate_up_proj`` / ``experts.down_proj``, a rank-r adapter per expert, saved as PEFT's
    ``target_parameters``; no dropout and no DoRA on them, as in PEFT)."""
    variant: Literal["lora", "rslora", "dora", "adalora"] = "lora"
    """``lora``: alpha/r; ``rslora``: alpha/sqrt(r); ``dora``: weight-decomposed LoRA (magnitude + direction);
    ``adalora``: SVD-form adapters whose ranks are reallocated across layers while training, from ``r``
    per layer down to ``adalora.target_r`` on average (keys ``lora.adalora.*``; docs/adapters.md)."""
    init: Literal["kaiming", "gaussian", "loftq"] = "kaiming"
    """Initialisation of A (B is zero so the adapter starts as the identity on the base model).
    ``loftq`` (Li et al. 2023): A and B from the SVD of the quantization error, so NF4 base + s B A
    starts closer to the 16-bit W than NF4 alone (needs ``model.quantization: nf4``; see docs/adapters.md)."""
    adalora: AdaLoRAConfig = field(default_factory=AdaLoRAConfig)
    loftq_iters: int = 1
    """LoftQ alternations (quantize W - s B A, then B A from the SVD of W - that). 1 keeps the base
    exactly NF4(W), so the adapter fits any NF4 load of the model; more re-quantize the base too."""
    dtype: Literal["bfloat16", "float32", "auto"] = "auto"
    """Adapter parameter dtype. ``auto`` = bfloat16 on CUDA, float32 on CPU."""
    loraplus_ratio: float = 1.0
    """LoRA+: B's learning rate is this times A's (16 is the paper's suggestion; 1 disables)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "r": AT_LEAST_1,
        "alpha": POSITIVE,
        "dropout": FRACTION,
        "loraplus_ratio": POSITIVE,
        "loftq_iters": AT_LEAST_1,
    }

    def check(self) -> None:
        if self.init == "loftq" and self.variant in ("dora", "adalora"):
            raise ConfigError(f"lora.init: loftq is for lora/rslora adapters (lora.variant is {self.variant})")
        if self.variant == "adalora" and self.adalora.target_r > self.r:
            raise ConfigError(f"lora.adalora.target_r: must be <= lora.r, AdaLoRA's initial rank "
                              f"(got {self.adalora.target_r} > {self.r})")


@dataclass
class DataConfig(Section):
    path: str = "builtin:demo"
    """A file (.jsonl .json .csv .parquet .txt), a directory, a hub dataset name, or ``builtin:demo``
    (a small generated instruction set). ``$QLORA_DATA`` (default ``../shared/data``) expands in paths."""
    format: Literal["text", "instruction", "chat", "prompt_completion", "sharegpt", "preference",
                    "unpaired", "prompt_only"] = "instruction"
    """How records become token sequences and which tokens carry loss. ``chat``: OpenAI messages
    (``messages: [{role, content}]``); ``sharegpt``: ``conversations: [{from, value}]``; both render
    through the chat template and train on assistant turns only. ``preference``: ``prompt``/``chosen``/
    ``rejected`` pairs (no ``prompt``: the shared prefix is the prompt; strings or messages);
    ``unpaired``: ``prompt``/``completion``/``label`` (KTO). Each side is scored on its completion only.
    ``prompt_only``: ``prompt`` plus any columns the GRPO reward functions read (e.g. ``answer``)."""
    seq_len: int = 512
    """Maximum tokens per training sequence (packed block length when ``pack`` is on)."""
    split: str = "train"
    """Split to read from a dataset directory or hub dataset."""
    eval_path: str | None = None
    """Separate evaluation data; when unset, ``eval_fraction`` of the training data is held out."""
    eval_fraction: float = 0.0
    """Share of the training records held out for evaluation (carved with ``train.seed``)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Field mapping from the format's names to the dataset's, e.g. ``{instruction: question, output: answer}``."""
    template: str = "alpaca"
    """Prompt template for ``instruction`` data (``alpaca`` or a format string with ``{instruction}`` ``{input}``)."""
    chat_template: str | None = None
    """Chat template: ``chatml``, ``llama-2``, ``llama-3``, ``mistral`` or a Jinja string; unset = the
    tokenizer's own."""
    marker_tokens: Literal["require", "add", "split"] = "require"
    """When a chat-template marker (e.g. ``<|im_start|>``) is not one token of the tokenizer: ``require``
    refuses, ``add`` adds it as a special token (embeddings grow, the new rows train and are saved with
    the adapter; needs ``model.resize_embeddings``), ``split`` keeps the pieces."""
    train_on_prompt: bool = False
    """Put loss on the prompt tokens too (default: completion only)."""
    pack: bool = False
    """Pack several short samples into one ``seq_len`` block without cross-attention."""
    group_by_length: bool = False
    """Batch samples of similar length together to cut padding."""
    max_samples: int | None = None
    """Use at most this many records (after shuffling with the seed)."""
    num_proc: int | None = None
    """Processes for ``datasets.map`` tokenization."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "path": NONEMPTY,
        "seq_len": Range(8),
        "eval_fraction": FRACTION,
        "max_samples": AT_LEAST_1,
        "num_proc": AT_LEAST_1,
    }


@dataclass
class TrainConfig(Section):
    max_steps: int | None = None
    """Optimizer steps to run (unset: 100, unless ``train.epochs`` sizes the run; set only one of the two)."""
    epochs: float | None = None
    """Passes over the training data instead of ``train.max_steps`` (HF's ``num_train_epochs``; fractions
    allowed): the step budget is ceil(epochs x micro-batches per epoch / grad_accum); the LR schedule and
    the progress bar run over it. Set ``train.max_steps`` or this, not both."""
    lr: float = 2e-4
    """Peak learning rate (QLoRA paper: 2e-4 for 7B/13B, 1e-4 for 33B/65B)."""
    batch_size: int = 1
    """Sequences per micro-batch."""
    grad_accum: int = 16
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    """bitsandbytes paged AdamW (8- or 32-bit state) or torch AdamW. Paging falls back to plain on the CPU."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up (transformers' schedulers)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 0.3
    """Gradient clipping norm (QLoRA paper: 0.3)."""
    seed: int = 42
    """Seed for adapter init, data order, dropout."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    device: str = "auto"
    """``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda[:N]``."""
    skip_bad_steps: int = 0
    """Steps with a non-finite loss or gradient norm to skip (their batches are consumed, nothing is
    applied) before the run stops with an error; 0 = stop at the first one."""
    distributed: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallel under ``accelerate launch --num_processes N``: ``ddp`` replicates the model and
    averages gradients; ``fsdp`` also shards the NF4 base, adapters and optimizer state across the
    GPUs (FSDP2 ``fully_shard`` per decoder layer; needs ``quantization.quant_storage`` = the compute
    dtype). ``none``: one process. See docs/distributed.md."""
    objective: Literal["sft", "dpo", "ipo", "kto", "orpo", "simpo", "grpo"] = "sft"
    """What the step minimises: ``sft`` (token-mean next-token loss), ``dpo``/``ipo``/``orpo``/``simpo``
    (paired preference data, ``data.format: preference``), ``kto`` (``data.format: unpaired``) or ``grpo``
    (``data.format: prompt_only``; completions sampled each step, scored by ``grpo.rewards``).
    DPO, IPO and KTO use the base with the adapter switched off as the reference (no second model);
    settings in the ``preference`` section. Definitions match TRL's (docs/preference.md)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "max_steps": AT_LEAST_1,
        "epochs": POSITIVE,
        "lr": POSITIVE,
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "weight_decay": AT_LEAST_0,
        "warmup_steps": AT_LEAST_0,
        "max_grad_norm": AT_LEAST_0,
        "seed": Range(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
        "save_every": AT_LEAST_0,
        "skip_bad_steps": AT_LEAST_0,
        "device": Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N (N a GPU index)"),
    }


@dataclass
class PerformanceConfig(Section):
    """Speed and memory knobs: none changes what is computed (within rounding), only how."""

    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward (non-reentrant) instead of storing them."""
    offload_activations: bool = False
    """With gradient checkpointing: keep the checkpointed hidden states in pinned CPU memory (CUDA only)."""
    mlp_chunk_tokens: int = 0
    """Sequence-tiled MLP: run each SwiGLU MLP over chunks of this many tokens, each checkpointed, so only
    one chunk's (B, chunk, intermediate) activations are alive at once (long contexts). 0 = off."""
    embeddings_on_cpu: bool = False
    """Keep the frozen input embedding table in (pinned) CPU memory and copy each step's looked-up
    (B, T, hidden) rows to the GPU (Llama-3-70B: frees 1.96 GiB). Tied embeddings stay on the device."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused Triton kernels (``triton``), the pure-torch reference (``torch``), or ``auto`` = Triton on CUDA."""
    group_projections: bool = True
    """Run q/k/v and gate/up as one grouped matmul each (one GEMM over the stacked weights, one adapter-A
    GEMM, one dx GEMM) where the adapters allow it (plain LoRA/rsLoRA, no active dropout). Same modules,
    same parameter names and adapter files; see docs/speed.md."""
    checkpoint_layers: Literal["auto", "all"] | int = "auto"
    """With gradient checkpointing: how many decoder layers to checkpoint (the first N; the others keep
    their activations and are not recomputed). ``all``; an integer N >= 0; or ``auto`` = as few as the
    memory estimate says fit in the CUDA device's memory (all on the CPU; see docs/speed.md)."""
    fused_add_norm: bool = True
    """Run each decoder layer's attention residual add and the RMSNorm after it as one kernel (our
    decoder layer, same children and parameter names). ``false`` keeps transformers' decoder layers
    (e.g. for its ``output_hidden_states`` capture); see docs/speed.md."""
    nf4_matmul: Literal["dequant", "chunked", "fused"] = "dequant"
    """NF4 base matmuls over more than 64 tokens (Triton kernels only): ``dequant`` = the whole W to a
    transient 16-bit copy, then cuBLAS; ``chunked`` = W in L2-sized row chunks, each chunk's GEMM at
    once; ``fused`` = one autotuned Triton GEMM that reads the packed 4-bit W (no 16-bit copy).
    Same results within rounding; which is fastest is measured by the GPU suite (docs/speed.md)."""
    compile: Literal["none", "default", "reduce-overhead"] = "none"
    """torch.compile each decoder layer (forward and backward, inside its checkpoint): ``default``
    (inductor: fused elementwise ops, less Python), ``reduce-overhead`` (also CUDA graphs: each
    layer's launches replayed at once; for short sequences, where the step is launch-bound; fixed
    shapes, e.g. ``data.pack: true``, avoid recompiles). ``none``: eager. Unmeasured on a GPU
    so far (docs/speed.md); lora/rslora adapters, one process."""
    loss_chunk_size: int = 0
    """Tokens per chunk of the fused linear + cross-entropy (0: automatic, never full fp32 logits)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "checkpoint_layers": WordOrRange(("auto", "all"), AT_LEAST_0),
        "mlp_chunk_tokens": AT_LEAST_0,
        "loss_chunk_size": AT_LEAST_0,
    }

    def check(self) -> None:
        if self.offload_activations and not self.gradient_checkpointing:
            raise ConfigError("performance.offload_activations: needs performance.gradient_checkpointing=true")


@dataclass
class EvalConfig(Section):
    """Evaluation during training: the eval split's loss and generation tasks."""

    every: int = 0
    """Evaluation loss every N optimizer steps (0: never)."""
    batches: int = 0
    """Evaluation batches per evaluation (0: the whole eval set)."""
    tasks: list[str] | None = None
    """Generation tasks (unset: none) scored by exact match every ``eval.every`` steps and at the last step, logged to
    metrics.jsonl (``eval_<task>_exact_match``) with predictions under ``output_dir/eval/step-N/``: a
    task name (``gsm8k``, ``gsm8k-train``) or a data file with prompt/answer fields, ``FILE@extractor``
    (see docs/eval.md)."""
    limit: int = 50
    """Examples per eval task (the first N; 0: all)."""
    max_new_tokens: int = 0
    """New-token limit of in-training generation (0: the task's default, 256 for GSM8K)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "every": AT_LEAST_0,
        "batches": AT_LEAST_0,
        "limit": AT_LEAST_0,
        "max_new_tokens": AT_LEAST_0,
    }


# experiment trackers accelerate knows (``output.report_to``)
TRACKERS = ("tensorboard", "wandb", "trackio", "aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")


@dataclass
class PreferenceConfig(Section):
    beta: float = 0.1
    """Temperature of the preference loss (DPO/IPO/KTO/ORPO/SimPO's beta; SimPO's paper uses ~2)."""
    label_smoothing: float = 0.0
    """Probability that a pair's preference is flipped (conservative DPO, SimPO); 0 = plain."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (the loss uses gamma / beta)."""
    simpo_nll_weight: float = 0.0
    """Weight of the chosen completions' NLL added to SimPO's loss (TRL's cpo_alpha; 0 = pure SimPO)."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable (label true) examples' losses."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable (label false) examples' losses."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "beta": POSITIVE,
        "label_smoothing": Range(0, 0.5, hi_open=True),
        "simpo_gamma": AT_LEAST_0,
        "simpo_nll_weight": AT_LEAST_0,
        "desirable_weight": AT_LEAST_0,
        "undesirable_weight": AT_LEAST_0,
    }


@dataclass
class GRPOConfig(Section):
    num_generations: int = 4
    """Completions sampled per prompt (the group whose rewards are normalised)."""
    max_completion_length: int = 64
    """New tokens per completion at most (also dr_grpo's normaliser)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1 = off)."""
    beta: float = 0.0
    """Weight of the KL to the adapter-off reference (0: no reference forward, TRL's default)."""
    epsilon: float = 0.2
    """Lower clip of the probability ratio (1 - epsilon)."""
    epsilon_high: float | None = None
    """Upper clip (1 + epsilon_high); unset = epsilon (DAPO's clip-higher sets it larger)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Loss normalisation as TRL names them: per-sequence token means (grpo), a token mean (bnpo, dapo:
    over the whole step here, so both are one large batch's) or sum / (completions x max length) (dr_grpo)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantages divided by the reward std of the group, of the batch, or not at all."""
    rewards: list[str] | None = None
    """Reward functions (unset: none; GRPO needs one): ``gsm8k_exact``, ``gsm8k_format``, ``module:function`` or ``file.py:function``,
    each called as ``fn(prompts=, completions=, **columns) -> list[float]``."""
    reward_weights: list[float] | None = None
    """Weight of each reward function (unset: all 1)."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "num_generations": Range(2),
        "max_completion_length": AT_LEAST_1,
        "temperature": POSITIVE,
        "top_p": Range(0, 1, lo_open=True),
        "beta": AT_LEAST_0,
        "epsilon": Range(0, 1, lo_open=True, hi_open=True),
        "epsilon_high": POSITIVE,
    }

    def check(self) -> None:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards or []):
            raise ConfigError(f"grpo.reward_weights: {len(self.reward_weights)} weights for {len(self.rewards or [])} "
                              "grpo.rewards; give one per function")


@dataclass
class OutputConfig(Section):
    log_every: int = 1
    """Write a metrics.jsonl line (and refresh the progress bar) every N optimizer steps."""
    keep_last: int = 2
    """Checkpoints to keep under ``output_dir/checkpoints`` (older ones are deleted)."""
    progress_bar: bool = True
    """Show a tqdm progress bar with loss, lr, tokens/s and memory."""
    overwrite: bool = False
    """Allow training into an ``output_dir`` that already holds a finished adapter."""
    report_to: list[str] | None = None
    """Experiment trackers through accelerate, e.g. ``[tensorboard, wandb]`` (unset: none; also trackio, aim, comet_ml,
    mlflow, clearml, dvclive, swanlab). They get the config, every metrics line and the memory estimate;
    a missing package or no network is a one-line warning. Local logs go to ``output_dir/tracking``."""
    run_name: str | None = None
    """Run (project) name the trackers show; default: the ``output_dir`` folder name."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "log_every": AT_LEAST_1,
        "keep_last": AT_LEAST_1,
    }

    def check(self) -> None:
        for name in self.report_to or []:
            if name not in TRACKERS:
                near = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.5)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"output.report_to: {name!r} is not a tracker (one of {', '.join(TRACKERS)}){hint}")


@dataclass
class Config(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    output_dir: str = "outputs/run"
    """Where the adapter, metrics.jsonl and checkpoints go."""
    resume: str | None = None
    """``auto`` (newest complete checkpoint in ``output_dir``), a checkpoint path, or unset to start fresh."""
    resume_allow_changes: bool = False
    """Resume even though the config or the training data differ from the checkpoint's (the run then
    continues at a data position that may not mean what it did); by default such a resume is refused."""

    RULES: ClassVar[dict[str, Any]] = {  # allowed values, field -> rule (config_rules)
        "output_dir": NONEMPTY,
        "resume": NONEMPTY,
    }

    def validate(self, prefix: str = "") -> "Config":
        """Validate every section (its fields' rules and its own checks), then the rules across sections;
        raise a one-line ConfigError naming the key."""
        super().validate(prefix)
        if self.data.marker_tokens == "add" and not self.model.resize_embeddings:
            raise ConfigError("data.marker_tokens: 'add' grows the vocabulary; also set model.resize_embeddings=true")
        if self.lora.init == "loftq" and self.model.quantization != "nf4":
            raise ConfigError("lora.init: loftq corrects the 4-bit quantization error; it needs model.quantization=nf4")
        if self.train.epochs is not None and self.train.max_steps is not None:
            raise ConfigError(f"train.epochs: {self.train.epochs:g} and train.max_steps {self.train.max_steps} both "
                              f"size the run; set one of them (train.max_steps=null to count in epochs)")
        if self.train.epochs is None and self.train.max_steps is None:
            self.train.max_steps = 100
        self._check_objective()
        lc = self.lora
        ada = lc.adalora
        if lc.variant == "adalora" and self.train.max_steps is not None and \
                ada.tinit >= self.train.max_steps - ada.tfinal:
            raise ConfigError(f"lora.adalora.tinit: {ada.tinit} + lora.adalora.tfinal {ada.tfinal} leave no "
                              f"budget phase in train.max_steps {self.train.max_steps}; lower them")
        if self.performance.compile != "none" and (self.lora.variant not in ("lora", "rslora") or
                                                   self.train.distributed != "none"):
            raise ConfigError(f"performance.compile: {self.performance.compile} supports lora/rslora adapters in "
                              f"one process (lora.variant={self.lora.variant}, "
                              f"train.distributed={self.train.distributed}); "
                              "set performance.compile=none")
        if self.train.distributed == "fsdp":
            if self.model.quantization == "nf4" and self.quantization.quant_storage == "uint8":
                raise ConfigError("quantization.quant_storage: FSDP shards floating-point tensors only; set it to "
                                  "the compute dtype (bfloat16 on CUDA, float32 on the CPU) with train.distributed=fsdp")
            for bad, key in ((self.performance.embeddings_on_cpu, "performance.embeddings_on_cpu"),
                             (self.lora.variant == "dora", "lora.variant=dora"),
                             (bool(self.eval.tasks), "eval.tasks")):  # generation needs whole weights
                if bad:
                    raise ConfigError(f"{key}: not supported with train.distributed=fsdp; use ddp or turn it off")
        return self

    def _check_objective(self) -> None:
        """train.objective against data.format (the objective decides what a batch holds)."""
        need = {"sft": None, "kto": "unpaired", "grpo": "prompt_only"}.get(self.train.objective, "preference")
        fmt = self.data.format
        if need is None and fmt in ("preference", "unpaired", "prompt_only"):
            raise ConfigError(f"data.format: {fmt} data trains with a preference objective; set train.objective "
                              "(dpo, ipo, orpo or simpo for preference pairs, kto for unpaired)")
        if need is not None and fmt != need:
            raise ConfigError(f"train.objective: {self.train.objective} needs data.format={need} "
                              f"(got {fmt})")
        if need is not None and self.data.pack:
            raise ConfigError(f"data.pack: not supported with train.objective={self.train.objective}; set it false")
        g = self.grpo
        if self.train.objective == "grpo" and not g.rewards:
            raise ConfigError("grpo.rewards: train.objective=grpo needs at least one reward function "
                              "(gsm8k_exact, gsm8k_format, module:function or file.py:function)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                fix: str = "fix it", ours: bool = False) -> Config:
    """Read a YAML file (or start from defaults), apply ``section.key=value`` overrides, validate.
    ``fix``: what to do about a damaged file; ``ours``: a config.yaml we wrote (always whole lines, so
    a cut-short one is recognised).

    Raises:
        ConfigError: one line naming the file, the key and the fix.
    """
    import yaml
    raw: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")

        text = read_text(p, fix, ConfigError, whole_lines=ours)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    cfg = config_from_dict(raw, where=where)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a nested dict (YAML shape), checking every key and type."""
    cfg = Config()
    _set_all(cfg, cfg, "", raw, where)
    return cfg


def _set_all(cfg: Config, obj: Any, prefix: str, raw: dict[str, Any], where: str) -> None:
    """Set every key of ``raw`` on ``obj`` (the section of ``cfg`` at ``prefix``), nested sections in turn."""
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if _is_section(type(obj), key):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name}: must be a mapping of keys, got {value!r}")
            _set_all(cfg, getattr(obj, key), f"{name}.", value, where)
        else:
            _set(cfg, name, value, where)


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` command-line override (value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    _set(cfg, key.strip(), value, "command line")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML, atomically."""
    import yaml

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def field_docs() -> dict[str, str]:
    """``section.key`` -> documentation string, read from the field docstrings in this file."""
    import ast
    import inspect
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["x"])))
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    sections = {cls.__name__: (prefix, cls) for prefix, cls in _sections(Config)}
    for cname, node in classes.items():
        if cname not in sections:
            continue
        prefix, cls = sections[cname]
        body = node.body
        for i, stmt in enumerate(body[:-1]):
            nxt = body[i + 1]
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                key = prefix + stmt.target.id
                rule = describe(cls.RULES.get(stmt.target.id))  # the enforced range
                docs[key] = " ".join(str(nxt.value.value).split() + ([rule] if rule else []))
    return {k: docs[k] for k in valid_keys() if k in docs}  # in field order, nested sections in place


# --------------------------------------------------------------------------------------------------
# helpers


def _is_section(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}.get(name)
    return f is not None and dataclasses.is_dataclass(_hints(cls)[name])


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(key prefix, class) of ``cls`` and every section nested in it, depth first (``Config`` is "")."""
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if _is_section(cls, f.name):
            out += _sections(_hints(cls)[f.name], f"{prefix}{f.name}.")
    return out


def valid_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every settable key (``section.key``, ``section.sub.key`` for a nested section), in field order."""
    cls = cls or Config
    keys = []
    for f in dataclasses.fields(cls):
        if _is_section(cls, f.name):
            keys += valid_keys(_hints(cls)[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def rules() -> dict[str, Any]:
    """``section.key`` -> the rule its value obeys (from each section's ``RULES``), for every ruled key."""
    return {prefix + name: rule for prefix, cls in _sections(Config) for name, rule in cls.RULES.items()}


# built but not measured on a GPU yet: settable, left out of --help-config until the GPU suite has measured them
UNADVERTISED = ("performance.nf4_matmul", "performance.compile")

# keys that moved to another section: old key -> its place now (a one-line error names it)
MOVED = {f"model.{k}": f"performance.{k}" for k in (
    "gradient_checkpointing", "offload_activations", "mlp_chunk_tokens", "embeddings_on_cpu", "kernels",
    "group_projections", "checkpoint_layers", "fused_add_norm", "nf4_matmul")} | {
    "train.compile": "performance.compile", "train.loss_chunk_size": "performance.loss_chunk_size"} | {
    f"train.eval_{k}": f"eval.{k}" for k in ("every", "batches", "tasks", "limit", "max_new_tokens")} | {
    f"lora.adalora_{k}": f"lora.adalora.{k}" for k in (
        "target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight")}


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    if key in MOVED:
        raise ConfigError(f"{where}: {key} is now {MOVED[key]}; rename it there")
    parts = key.split(".")
    obj: Any = cfg
    for part in parts[:-1]:
        if not _is_section(type(obj), part):
            raise ConfigError(_unknown(key, where))
        obj = getattr(obj, part)
    name = parts[-1]
    if name not in {f.name for f in dataclasses.fields(obj)} or _is_section(type(obj), name):
        raise ConfigError(_unknown(key, where))
    setattr(obj, name, coerce(key, value, _hints(type(obj))[name], where))


def _unknown(key: str, where: str) -> str:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid_keys())}"
    return f"{where}: unknown key {key!r}{hint}"
