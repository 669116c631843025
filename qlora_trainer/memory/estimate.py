"""Analytic peak-memory model of one QLoRA training step (no GPU, nothing loaded).

Three quantities, never mixed up (docs/memory.md derives every term):

* **allocated**: bytes in PyTorch's caching allocator at the step's peak (what
  ``torch.cuda.max_memory_allocated`` reports) = the sum of :attr:`MemoryEstimate.components`;
* **reserved**: what the allocator holds from the driver, ``allocated * RESERVE_FACTOR +
  RESERVE_OVERHEAD`` (fragmentation and cached blocks; fitted below);
* **device**: reserved + paged optimizer buffers (CUDA unified memory, outside the allocator) +
  the CUDA context. ``total_gb`` and ``fits`` use this, in GB (1e9 B); GiB (2**30 B) are labelled.

Two system profiles: ``hf`` (transformers + PEFT: ``prepare_model_for_kbit_training`` upcasts
embeddings, lm_head and norms to fp32, which makes the residual stream fp32; fp32 adapters; full
fp32 logits) and ``ours`` (no upcast, bf16 adapters, chunked linear + cross-entropy, optional
activation offload).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlora_trainer.memory.quant import adam_state_bytes, nf4_weight_bytes, quant_constant_bytes
from qlora_trainer.models.catalog import ArchSpec, CATALOG, arch_from_hf_config, linear_shapes, param_counts
from qlora_trainer.models.catalog import expert_shapes
from qlora_trainer.targets import select_targets
from qlora_trainer.data.templates import new_token_bound
from qlora_trainer.kernels.cross_entropy import auto_chunk_size
from qlora_trainer.runtime import expand_path, launched_world

GIB = 2**30
GB = 10**9
# reserved = 1.04 * allocated + 0.25 GiB: least-squares line through the four HF-stack H100 runs of
# the paper table (allocated 5.75/9.75/21.4/40.0 GiB vs reserved 6.6/11.0/24.0/44.5 GB; residuals
# < 1.5%); see memory/references.py.
RESERVE_FACTOR = 1.04
RESERVE_OVERHEAD = int(0.25 * GIB)
# CUDA context (driver, cuBLAS/cuDNN handles, kernel images with lazy loading) on an H100 with
# CUDA 12: nvidia-smi minus torch.cuda.memory_reserved() is typically 0.4-0.6 GiB; we take 0.5 GiB.
# Not measured in this repository (no GPU in the task that wrote it): `memory --measure` reports it.
CUDA_CONTEXT = int(0.5 * GIB)
OFFLOAD_LAYERS_IN_FLIGHT = 2  # checkpoints resident on the GPU while the rest sit in pinned CPU memory


@dataclass(frozen=True)
class SystemProfile:
    """What a training stack does with memory. ``upcast``: fp32 embeddings/lm_head/norms (and thus
    an fp32 residual stream). ``adapter_bytes``: LoRA parameter/gradient width. ``full_logits``:
    materialise (tokens, vocab) logits instead of chunking."""

    name: str
    upcast: bool
    adapter_bytes: int
    full_logits: bool
    mlp_saved: int = 4
    dropout_bytes: int = 3


PROFILES = {
    "hf": SystemProfile("hf", upcast=True, adapter_bytes=4, full_logits=True),
    "hf-noupcast": SystemProfile("hf-noupcast", upcast=False, adapter_bytes=4, full_logits=True),
    "ours": SystemProfile("ours", upcast=False, adapter_bytes=2, full_logits=False, mlp_saved=3, dropout_bytes=0),
}


@dataclass
class MemoryEstimate:
    """Per-component peak bytes of one training step and the derived totals."""

    arch: str
    settings: dict
    components: dict[str, int]                                 # allocator-counted, bytes
    paged_bytes: int = 0                                       # unified memory (paged optimizer)
    host_bytes: int = 0                                        # pinned CPU memory (offload)
    notes: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # activation moments, bytes

    @property
    def static_bytes(self) -> int:
        """Weights, adapters, their gradients and optimizer state: live through the whole step."""
        moment = set().union(*self.phases.values()) if self.phases else set()
        return sum(v for k, v in self.components.items() if k not in moment)

    def phase_bytes(self, phase: str) -> int:
        """Allocated peak of one moment (``forward`` or ``backward``): static + its activations."""
        return self.static_bytes + sum(self.phases[phase].values())

    @property
    def allocated_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def reserved_bytes(self) -> int:
        return int(self.allocated_bytes * RESERVE_FACTOR) + RESERVE_OVERHEAD

    @property
    def device_bytes(self) -> int:
        return self.reserved_bytes + self.paged_bytes + CUDA_CONTEXT

    @property
    def allocated_gib(self) -> float:
        return self.allocated_bytes / GIB

    @property
    def total_gb(self) -> float:
        """Whole-device footprint in GB (1e9 B): reserved + paged + CUDA context."""
        return self.device_bytes / GB

    def fits(self, budget_gb: float, basis: str = "device") -> bool:
        """Within ``budget_gb`` GB? basis ``device`` (default) or ``allocated`` (GiB, like the
        HF-stack references that quote max_memory_allocated)."""
        if basis == "allocated":
            return self.allocated_bytes <= budget_gb * GIB
        return self.device_bytes <= budget_gb * GB

    def to_dict(self) -> dict:
        return {"arch": self.arch, "settings": self.settings,
                "components": {k: round(v / GB, 4) for k, v in self.components.items()},
                "allocated_gib": round(self.allocated_gib, 3),
                "reserved_gib": round(self.reserved_bytes / GIB, 3),
                "paged_gib": round(self.paged_bytes / GIB, 3),
                "cuda_context_gib": round(CUDA_CONTEXT / GIB, 3),
                "host_pinned_gib": round(self.host_bytes / GIB, 3),
                "total_gb": round(self.total_gb, 3), "notes": self.notes}


def _targeted(arch: ArchSpec, targets: str | list[str]) -> list[tuple[str, int, int, bool]]:
    """One decoder layer's targeted linear shapes, matched by ``lora.inject``'s rules on HF Llama
    names (``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.shared_expert.up_proj``); the
    estimate applies the choice to every layer."""
    attention = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
    shapes = {f"model.layers.0.{'self_attn' if n in attention else 'mlp'}.{n}": s
              for s in linear_shapes(arch) for n in [s[0]]}
    return [shapes[n] for n in select_targets(shapes, targets)]


def layer_activation_bytes(arch: ArchSpec, tokens: int, *, resid_bytes: int, dropout_bytes: int,
                           mlp_tokens: int | None = None, mlp_saved: int = 3, act_bytes: int = 2) -> int:
    """Saved activations of one decoder layer's forward (what a checkpointed layer rebuilds in
    backward), excluding the layer input (the checkpoint itself). Per token, with b = ``act_bytes``:
    the post-attention residual h1 (the second norm's input) and the two norm outputs at
    ``resid_bytes`` (fp32 under HF's upcast); q (after RoPE), k, v and the attention output at b; ``mlp_saved`` intermediate-width
    tensors (ours: gate, up, silu(gate)*up; the HF MLP also keeps silu(gate)); with LoRA dropout,
    ``dropout_bytes`` per adapter input element (HF: a 16-bit dropped copy + 1-byte mask = 3; ours:
    0, the mask is regenerated from a seed). LoRA's (tokens, r) products are negligible.

    ``mlp_tokens`` (default ``tokens``): tokens whose MLP intermediates are alive at once. The
    sequence-tiled MLP (``performance.mlp_chunk_tokens``) checkpoints each chunk, so only one chunk's
    intermediates (and its gate/up/down dropout inputs) count; the MLP's input stays ``tokens`` wide."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    mlp = tokens if mlp_tokens is None else min(tokens, mlp_tokens)
    per_tok = resid_bytes * 3 * h + act_bytes * (2 * h + 2 * kv)
    per_mlp_tok = act_bytes * mlp_saved * i
    per_tok += dropout_bytes * 4 * h          # q, k, v, o adapters
    per_mlp_tok += dropout_bytes * (2 * h + i)  # gate, up, down adapters
    return tokens * per_tok + mlp * per_mlp_tok


def layer_backward_bytes(arch: ArchSpec, tokens: int, *, resid_bytes: int, mlp_tokens: int | None = None,
                         act_bytes: int = 2, attn: str = "sdpa", dropout: bool = False) -> int:
    """Gradient tensors alive on top of a layer's saved activations at the peak of its backward:
    the incoming gradient of the layer output (tokens, hidden) at ``resid_bytes``, plus the larger of
    (a) the MLP backward: d(silu(g)*u) and dgate/dup, 2 intermediate-wide, and the gate/up input
    gradients, 2 hidden-wide, for one MLP chunk (measured on the CPU with
    :class:`~qlora_trainer.memory.trace.LiveBytes`: 5 intermediate-wide tensors live, 3 of them saved;
    with LoRA dropout 6: down_proj's backward regenerates its (tokens, intermediate) mask and forms
    (du A) next to d(silu(g)*u));
    (b) the attention backward: d(attention output), dq, dk, dv at b, and for SDPA/flash on CUDA the
    kernel's fp32 dq accumulator (tokens, hidden) and, with GQA, its head-expanded dk/dv
    (2 x (tokens, hidden) at b; FlashAttention-2's ``mha_bwd``) - kernel workspace the CPU trace cannot
    see, not yet measured on a GPU. The MLP's saved tensors are freed before (b) starts."""
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    mlp = tokens if mlp_tokens is None else min(tokens, mlp_tokens)
    mlp_bwd = mlp * act_bytes * ((3 if dropout else 2) * i + 2 * h)
    attn_bwd = tokens * act_bytes * (2 * h + 2 * kv)
    if attn != "eager":
        attn_bwd += tokens * 4 * h + (tokens * act_bytes * 2 * h if kv < h else 0)
    mlp_freed = tokens * (resid_bytes * h + act_bytes * h) + mlp * act_bytes * 3 * i  # h1, n2, gate/up/act
    return tokens * resid_bytes * h + max(mlp_bwd, attn_bwd - mlp_freed, 0)


def estimate(
    arch: ArchSpec,
    *,
    seq_len: int,
    batch: int = 1,
    lora_r: int = 16,
    targets: str | list[str] = "all-linear",
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    optimizer: str = "paged_adamw_8bit",
    checkpointing: bool = True,
    checkpointed_layers: int | None = None,
    offload: bool = False,
    chunked_loss: bool | None = None,
    loss_chunk: int = 0,
    system: str = "ours",
    lora_dropout: float = 0.05,
    attn: str = "sdpa",
    mlp_chunk: int = 0,
    act_bytes: int = 2,
    embeddings_on_cpu: bool = False,
    gpus: int = 1,
    distributed: str = "none",
    new_tokens: int = 0,
    lora_experts: bool = True,
    lora_router: bool = False,
) -> MemoryEstimate:
    """Peak memory of a training step of ``arch`` (bs ``batch`` x ``seq_len`` tokens).

    ``chunked_loss`` overrides the profile's logits handling (None = profile default).
    ``mlp_chunk`` > 0: sequence-tiled MLP (``performance.mlp_chunk_tokens``); the layer's intermediate-
    width activations count ``batch * min(seq_len, mlp_chunk)`` tokens instead of ``batch * seq_len``.
    The chunk outputs (hidden-wide, concatenated) are not counted separately: they are the MLP output
    the untiled count already omits as the next residual.
    ``act_bytes``: bytes of an activation element (2 for bf16/fp16 compute; 4 for fp32, the CPU).
    ``embeddings_on_cpu``: the input embedding table stays in CPU memory (``performance.embeddings_on_cpu``).
    ``gpus`` / ``distributed`` (``none|ddp|fsdp``, ``train.distributed``): the estimate is **per GPU**
    (``batch`` is the per-GPU micro-batch); see :func:`per_gpu` for what each mode shares.
    ``checkpointed_layers``: with ``checkpointing``, only the first N decoder layers are checkpointed
    (``performance.checkpoint_layers``; None = all); the others hold their activations like an
    un-checkpointed run.
    ``new_tokens``: tokens added to the vocabulary (``data.marker_tokens: add``): the embedding, output
    layer and logits grow by them, and their embedding (and untied output) rows train (``lora/tokens.py``).
    Mixture-of-experts archs (``arch.experts``): the fused experts in NF4 by our path (``experts_nf4``,
    ``experts_quant_constants``; 16-bit with ``quant`` none), the 16-bit router, with ``lora_experts``
    (``lora.target_experts``) a rank-``lora_r`` adapter per expert weight, with ``lora_router``
    (``lora.target_router``) one on the router (E, hidden), and the routed tokens' activations
    (:func:`moe_layer_arch`).

    The peak is the static part (weights, adapters, optimizer) plus the larger of two moments that
    never coexist (``MemoryEstimate.phases``): the end of the forward (checkpoints, final hidden
    states, loss workspace) and the backward of one layer (checkpoints, its recomputed activations,
    their gradients, kernel workspaces). ``components`` lists what is live at the larger one.
    """
    if system not in PROFILES:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(PROFILES)}")
    prof = PROFILES[system]
    if new_tokens:
        arch = replace(arch, vocab=arch.vocab + new_tokens)
    if chunked_loss is not None:
        prof = replace(prof, full_logits=not chunked_loss)
    wide = 4 if prof.upcast else 2          # embeddings / lm_head / norms / residual stream
    counts = param_counts(arch)
    tokens = batch * seq_len
    comp: dict[str, int] = {}
    notes: list[str] = []
    shapes = linear_shapes(arch)
    if quant == "nf4":
        comp["base_nf4"] = arch.layers * sum(nf4_weight_bytes(i * o) for _, i, o, _ in shapes)
        comp["quant_constants"] = arch.layers * sum(
            quant_constant_bytes(i * o, blocksize=blocksize, double_quant=double_quant) for _, i, o, _ in shapes)
    else:
        comp["base_16bit"] = 2 * counts["linear"]
    eshapes = expert_shapes(arch)
    if arch.is_moe:  # fused experts: our NF4 path on the (E * out, in) view of each weight, and the router
        if quant == "nf4":
            comp["experts_nf4"] = arch.layers * sum(nf4_weight_bytes(arch.experts * i * o) for _, i, o in eshapes)
            comp["experts_quant_constants"] = arch.layers * sum(
                quant_constant_bytes(arch.experts * i * o, blocksize=blocksize, double_quant=double_quant)
                for _, i, o in eshapes)
        else:
            comp["experts_16bit"] = 2 * counts["experts"]
        comp["router"] = 2 * counts["router"]
    comp["embeddings"] = 0 if embeddings_on_cpu and not arch.tied else wide * counts["embed"]
    comp["lm_head"] = wide * counts["lm_head"]
    comp["norms_biases"] = wide * counts["norms"] + 2 * counts["biases"]
    if arch.is_moe and quant == "nf4" and gpus == 1:
        notes.append(moe_load_note(arch, comp, blocksize=blocksize))

    lora_tensors = [n for _, i, o, _ in _targeted(arch, targets) for n in (lora_r * i, o * lora_r)]
    if lora_experts:  # lora_A (r * E, in), lora_B (out, r * E) per expert weight (lora/experts.py)
        lora_tensors += [n for _, i, o in eshapes for n in (lora_r * arch.experts * i, o * lora_r * arch.experts)]
    if lora_router and arch.is_moe:  # lora_A (r, hidden), lora_B (E, r) (lora/router.py)
        lora_tensors += [lora_r * arch.hidden, arch.experts * lora_r]
    n_lora = arch.layers * sum(lora_tensors)
    comp["lora_params"] = prof.adapter_bytes * n_lora
    comp["lora_grads"] = prof.adapter_bytes * n_lora
    opt = [adam_state_bytes(n, optimizer=optimizer, param_bytes=prof.adapter_bytes) for n in lora_tensors]
    comp["optimizer_states"] = arch.layers * sum(a for a, _ in opt)
    paged = arch.layers * sum(p for _, p in opt)
    if new_tokens:  # trainable rows of the added tokens: values, gradients, optimizer state
        n_rows = new_tokens * arch.hidden * (1 if arch.tied else 2)
        state, paged_rows = adam_state_bytes(n_rows, optimizer=optimizer, param_bytes=prof.adapter_bytes)
        comp["token_rows"] = 2 * prof.adapter_bytes * n_rows + state
        paged += paged_rows

    # -- activations: the loss moment (end of forward) and a layer's backward never coexist --------
    b, r = act_bytes, max(wide, act_bytes)   # activation / residual-stream bytes
    mlp_tokens = batch * min(seq_len, mlp_chunk) if mlp_chunk > 0 else None
    dense_arch, arch = arch, moe_layer_arch(arch)  # MoE: the routed tokens' widths (see moe_layer_arch)
    layer = layer_activation_bytes(arch, tokens, resid_bytes=r, mlp_tokens=mlp_tokens, act_bytes=b,
                                   dropout_bytes=prof.dropout_bytes if lora_dropout > 0 else 0,
                                   mlp_saved=prof.mlp_saved)
    ckpt = tokens * arch.hidden * r          # one saved layer input
    host = 0
    held: dict[str, int] = {}
    n_ck = 0 if not checkpointing else arch.layers if checkpointed_layers is None else \
        max(0, min(arch.layers, checkpointed_layers))
    if n_ck < arch.layers:
        held["activations"] = (arch.layers - n_ck) * (layer + ckpt)
    if n_ck:
        resident = min(n_ck, OFFLOAD_LAYERS_IN_FLIGHT) if offload else n_ck
        host = (n_ck - resident) * ckpt if offload else 0
        held["checkpoints"] = resident * ckpt
    forward = dict(held, final_hidden=2 * tokens * arch.hidden * r)  # last layer output + final norm
    if prof.full_logits:   # at the loss backward: logits (lm_head dtype; the model output holds them),
        # the fp32 log-softmax output cross_entropy saves, its gradient and the logits' fp32 gradient
        forward["logits_loss"] = tokens * arch.vocab * (wide + 12)
    else:                  # one (C, V) chunk whose gradient overwrites it + dL/dh (N, H), made in forward

        chunk = min(tokens, loss_chunk or auto_chunk_size(tokens, arch.vocab, arch.hidden))
        forward["logits_loss"] = chunk * arch.vocab * b + tokens * arch.hidden * b
        if new_tokens:  # token-row output layer: models/loss.py's module-head path, one checkpointed chunk
            chunk = min(tokens, loss_chunk or 1024)  # of logits, their row-replaced copy, fp32 copy and grad
            forward["logits_loss"] = chunk * arch.vocab * (2 * b + 8) + tokens * arch.hidden * b
    backward = dict(held, layer_recompute=layer if n_ck else 0,
                    layer_backward=layer_backward_bytes(arch, tokens, resid_bytes=r, mlp_tokens=mlp_tokens,
                                                        act_bytes=b, attn=attn, dropout=lora_dropout > 0))
    if attn == "eager":    # (B, heads, T, T) scores and probabilities
        backward["attention_workspace"] = 2 * batch * arch.heads * seq_len * seq_len * b
    else:                  # SDPA / flash: logsumexp + softmax_d rows (fp32)
        backward["attention_workspace"] = 2 * batch * arch.heads * seq_len * 4
    # bitsandbytes / our kernels dequantize each 4-bit weight to 16 bits for its matmul (freed right after)
    backward["dequant_workspace"] = b * max(i * o for _, i, o, _ in shapes + [(0, i, o, 0) for _, i, o in eshapes]) \
        if quant == "nf4" else 0
    arch = dense_arch
    if arch.is_moe:  # the routed copies of each token's input (saved by the experts' LoRA matmuls) + router
        backward["experts_routing"] = tokens * (arch.experts_per_token * arch.hidden * b + arch.experts * 4)
    per_gpu(comp, backward, arch, shapes, gpus=gpus, distributed=distributed, notes=notes,
            quant=quant, wide=wide)
    phases = {"forward": forward, "backward": backward}
    peak, other = sorted(phases, key=lambda k: sum(phases[k].values()), reverse=True)
    comp.update(phases[peak])
    if paged:
        notes.append(f"{paged / GIB:.2f} GiB of optimizer state is paged (unified memory, not in allocated)")
    if host:
        notes.append(f"{host / GIB:.2f} GiB of checkpoints offloaded to pinned CPU memory")
    settings = dict(seq_len=seq_len, batch=batch, lora_r=lora_r, targets=targets, quant=quant,
                    double_quant=double_quant, optimizer=optimizer, checkpointing=checkpointing,
                    checkpointed_layers=n_ck, offload=offload, system=prof.name, full_logits=prof.full_logits,
                    attn=attn, mlp_chunk=mlp_chunk, act_bytes=act_bytes, embeddings_on_cpu=embeddings_on_cpu,
                    gpus=gpus, distributed=distributed, new_tokens=new_tokens)
    if embeddings_on_cpu and not arch.tied:
        host += wide * counts["embed"]
        notes.append(f"{wide * counts['embed'] / GIB:.2f} GiB input embedding table in CPU memory")
    notes.append(f"peak at the {'end of the forward (loss)' if peak == 'forward' else 'backward of a layer'}; "
                 f"the other moment needs {sum(phases[other].values()) / GIB:.2f}"
                 f" GiB of activations instead of {sum(phases[peak].values()) / GIB:.2f}")
    return MemoryEstimate(arch.name, settings, comp, paged_bytes=paged, host_bytes=host, notes=notes,
                          phases=phases)


def moe_layer_arch(arch: ArchSpec) -> ArchSpec:
    """The arch whose dense-MLP activation terms equal an MoE layer's: each token runs through
    ``experts_per_token`` experts of width ``intermediate`` (and Qwen2-MoE's shared expert of width
    ``shared_intermediate``), so its intermediate-wide activations are
    ``experts_per_token * intermediate + shared_intermediate`` wide (the arch itself when dense)."""
    if not arch.is_moe:
        return arch
    return replace(arch, intermediate=arch.experts_per_token * arch.intermediate + arch.shared_intermediate)


def moe_load_note(arch: ArchSpec, comp: dict[str, int], *, blocksize: int = 64) -> str:
    """The load peak of an MoE arch in NF4 (``models/moe_load.py``, quantized while loading): the
    weights in ``comp`` so far, plus one expert's 16-bit ``gate_up_proj`` (2I, H) and the fp32 scales
    of one whole ``gate_up_proj`` (E * 2I * H / blocksize floats), kept until its last expert is in."""
    weights = sum(comp.values())
    gate_up = 2 * arch.intermediate * arch.hidden  # one expert's elements
    transient = 2 * gate_up + 4 * arch.experts * gate_up // blocksize
    dense = 2 * param_counts(arch)["experts"]
    return (f"loading peaks near {(weights + transient) / GIB:.2f} GiB: the NF4 weights plus "
            f"{transient / GIB:.2f} GiB while the experts are quantized one at a time (their 16-bit "
            f"{dense / GIB:.1f} GiB never reach the device)")


def per_gpu(comp: dict[str, int], backward: dict[str, int], arch: ArchSpec, shapes: list, *, gpus: int,
            distributed: str, notes: list[str], quant: str, wide: int) -> None:
    """Turn one device's static components into one GPU's share, in place (``train.distributed``).

    * ``ddp``: everything replicated; DDP's gradient buckets add one copy of the LoRA gradients
      (``ddp_buckets``).
    * ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer, the input embeddings, and the root unit
      with norm + lm_head): each sharded tensor costs ``ceil(bytes / gpus)``: the NF4 base, the
      embeddings, the norms. Not sharded: bitsandbytes' quantization constants (absmax tensors are
      not parameters, FSDP never sees them), the LoRA adapters, their gradients and optimizer state
      (``ignored_params``: replicated). Gathered: the root unit's lm_head stays unsharded for the whole
      step (the loss reads its weight directly), on top of its shard; while a layer runs, it and the
      prefetched next layer are all-gathered (``fsdp_gather`` = 2 layers' NF4 storage, in the backward
      moment; the forward moment has at most the last layer's, dominated by the loss)."""
    if distributed not in ("none", "ddp", "fsdp"):
        raise ValueError(f"distributed must be none, ddp or fsdp (got {distributed!r})")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1 (got {gpus})")
    if distributed == "ddp":
        comp["ddp_buckets"] = comp["lora_grads"]
    if distributed != "fsdp":
        return

    def shard(b: int) -> int:
        return -(-b // gpus)

    for key in ("base_nf4", "base_16bit", "embeddings", "norms_biases", "experts_nf4", "experts_16bit"):
        if key in comp:
            comp[key] = shard(comp[key])
    comp["lm_head"] = comp["lm_head"] + shard(comp["lm_head"])
    layer_base = sum(nf4_weight_bytes(i * o) if quant == "nf4" else 2 * i * o for _, i, o, _ in shapes)
    layer_base += sum(nf4_weight_bytes(arch.experts * i * o) if quant == "nf4" else 2 * arch.experts * i * o
                      for _, i, o in expert_shapes(arch))
    backward["fsdp_gather"] = 2 * layer_base
    notes.append(f"per GPU of {gpus} (fsdp): base, embeddings and norms sharded; quantization constants, "
                 f"adapters and optimizer state replicated; lm_head gathered for the step")


def largest_fitting(arch: ArchSpec, budget_gb: float, *, vary: str = "seq_len", basis: str = "device",
                    step: int = 128, **kwargs) -> int:
    """Largest ``seq_len`` (multiple of ``step``, <= the model's context) or ``batch`` that fits
    ``budget_gb``; 0 when even the smallest does not. Memory is monotone in both, so bisect."""
    if vary == "seq_len":
        unit, hi = step, max(1, arch.max_position // step)
    else:
        unit, hi = 1, 4096
    kwargs.setdefault("seq_len", 512)

    def ok(k: int) -> bool:
        return estimate(arch, **{**kwargs, vary: k * unit}).fits(budget_gb, basis)

    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo * unit


def resolve_arch(name_or_path: str) -> tuple[ArchSpec | None, str]:
    """Catalog name, ``random:<name>`` or a local model dir / config.json -> (arch, ""), or
    (None, reason) for hub ids that are not on disk (never downloads)."""
    from pathlib import Path

    name = name_or_path.removeprefix("random:")
    if name in CATALOG:
        return CATALOG[name], ""
    path = Path(expand_path(name_or_path))
    if path.exists():
        return arch_from_hf_config(path), ""
    low = name.lower().rsplit("/", 1)[-1]
    if low in CATALOG:
        return CATALOG[low], ""
    return None, (f"{name_or_path!r} is neither a catalog name nor a local model directory "
                  "(hub ids are not downloaded); pass a catalog name or a directory with config.json")


def estimate_for_config(cfg, checkpointed_layers: int | None = None) -> MemoryEstimate | None:
    """The estimate for a run :class:`~qlora_trainer.config.Config` (our profile), or None (with the
    reason logged) when the model's shape cannot be known without downloading.
    ``checkpointed_layers``: the plan's answer for ``performance.checkpoint_layers`` (None = all)."""
    import logging

    arch, reason = resolve_arch(cfg.model.name_or_path)
    if arch is None:
        logging.getLogger(__name__).info("no memory estimate: %s", reason)
        return None
    return estimate(
        arch, seq_len=cfg.data.seq_len, batch=cfg.train.batch_size, lora_r=cfg.lora.r,
        targets=cfg.lora.targets, quant=cfg.model.quantization,
        double_quant=cfg.quantization.double_quant, blocksize=cfg.quantization.blocksize,
        optimizer=cfg.train.optimizer, checkpointing=cfg.performance.gradient_checkpointing,
        checkpointed_layers=checkpointed_layers,
        offload=cfg.performance.offload_activations, loss_chunk=cfg.performance.loss_chunk_size,
        lora_dropout=cfg.lora.dropout, mlp_chunk=cfg.performance.mlp_chunk_tokens,
        embeddings_on_cpu=cfg.performance.embeddings_on_cpu,
        attn="eager" if cfg.model.attn_implementation == "eager" or
        (cfg.model.attn_implementation == "auto" and arch.family == "gemma2") else "sdpa", system="ours",
        gpus=launched_world(), distributed=cfg.train.distributed,
        new_tokens=new_token_bound(cfg.data.format, cfg.data.chat_template, cfg.data.marker_tokens),
        lora_experts=cfg.lora.target_experts, lora_router=cfg.lora.target_router)


__all__ = ["GB", "GIB", "MemoryEstimate", "PROFILES", "SystemProfile", "estimate", "moe_layer_arch", "moe_load_note",
           "estimate_for_config", "largest_fitting", "per_gpu", "resolve_arch"]
