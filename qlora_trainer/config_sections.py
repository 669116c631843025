"""The config's sections (everything but the top level, :class:`qlora_trainer.config.Config`): typed
dataclasses whose field docstrings are their documentation, each validating itself (:class:`Section`)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qlora_trainer.config_rules import (AT_LEAST_0, AT_LEAST_1, FRACTION, NONEMPTY, POSITIVE, OneOf, Pattern, Range,
                                         WordOrRange, problem)
from qlora_trainer.errors import ConfigError


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
    target_router: bool = False
    """Mixture-of-experts models: also adapt the router (``mlp.gate.weight`` (E, H), the expert logits;
    kept 16-bit), a rank-r adapter saved as PEFT's ``target_parameters``; no dropout, and not with
    ``lora.variant`` dora or adalora. Loading such an adapter (or one on the experts) needs PEFT >= 0.20."""
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
        if self.target_router and self.variant in ("dora", "adalora"):
            raise ConfigError(f"lora.target_router: the router's adapter is plain LoRA (PEFT's target_parameters); "
                              f"use lora.variant lora or rslora (got {self.variant}), or lora.target_router: false")
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
