"""What one training step launches, op by op: our trainer (with its options) and the HF stack.

:func:`step_ops` lists the :class:`~benchmarks.speed.ops.Op` s of one optimizer step (``grad_accum``
micro-batches of ``batch x seq_len`` tokens + the optimizer) from the catalog shape
(:class:`~qlora_trainer.models.catalog.ArchSpec`) and :class:`StepOptions`. The same code path as
the trainer's, read off the sources:

* **ours** (``system="ours"``, ``kernels=True``): every targeted linear is
  ``kernels.lora_linear.LoRALinearFunction``: forward = [device seed + x*k/(1-p), one Triton
  launch] + x@A^T + NF4 dequant (Triton) + x@W^T + addmm_(u, B^T); backward = dy@B (*s), dy^T@u
  (*s), dequant + dy@W, addmm_ of (du@A) [or du@A, then dx += (du@A)*k/(1-p) and x*k/(1-p): one
  Triton launch each] + du^T@x_l. RMSNorm, RoPE, SwiGLU and the
  chunked linear + cross-entropy are one Triton launch each (``models/adapt.py``,
  ``kernels/cross_entropy.py``); attention is SDPA (flash); checkpointing recomputes each
  checkpointed layer's forward in the backward (torch's early stop skips the layer's last
  residual add); the sequence-tiled MLP runs one more MLP forward per chunk.
* **hf** (transformers + PEFT + bitsandbytes as ``benchmarks/systems/hf.py`` runs it, no autocast):
  ``prepare_model_for_kbit_training`` makes norms, embeddings and lm_head fp32, so the residual
  stream, q/k/v, attention and the MLP are fp32; every ``Linear4bit`` casts its input to bf16,
  dequantizes (bitsandbytes: absmax dequant, += offset, 4-bit dequant = 3 launches) and casts the
  output back to fp32; PEFT's fp32 LoRA adds A, B, *scale, + ; the backward dequantizes again
  (``MatMul4Bit.backward``); checkpointing makes it three dequantizations per weight per step.
  Full (N, V) fp32 logits, log-softmax + NLL.

Planned speed work is expressed as options (``fused_qkv``, ``fused_gate_up``,
``skip_down_recompute``, ``fused_dequant_gemm``, ``cuda_graphs``) so its predicted effect can be shown
before it is built. The launch and dequantization counts of ``ours`` are tested equal to those of a
real CPU step of the tiny model (``tests/benchmarks/speed/test_counts.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

from qlora_trainer.models.catalog import ArchSpec
from benchmarks.speed.ops import Op, attention, dequant, elementwise, gemm, host, merge_ops, nf4_bytes

DECODE_MAX_TOKENS = 64  # kernels/lora_linear.py: fused dequant-in-GEMM at or below this many tokens


@dataclass(frozen=True)
class StepOptions:
    """Everything about a run that changes the step's ops (all explicit, nothing read implicitly).

    system: ``ours`` | ``hf``. kernels: our Triton kernels (False: their torch references, ``performance.kernels: torch``).
    ckpt_every: checkpoint one decoder layer in every k (1 = all, 0 = none). ckpt_layers: when set,
    exactly that many layers are checkpointed (``performance.checkpoint_layers``: the first N; overrides
    ckpt_every unless ckpt_every is 0). mlp_chunk: tokens per
    sequence-tiled MLP chunk (0 = off). offload: checkpoints to pinned CPU memory (copied back over
    PCIe before each recompute). dropout: LoRA dropout p. loss_chunk: rows per loss chunk (0 = auto).
    act_bytes: 2 (bf16 on CUDA) or 4 (fp32 on the CPU). clip_grad: the trainer clips the grad norm.
    skip_down_recompute (built, on by default: ``LoRALinear.recompute_skips_base`` in checkpointed layers) - the
    recompute skips down_proj's dequantization and base GEMM (its adapter term still runs).
    Speed work: fused_qkv / fused_gate_up (built, on by default: ``performance.group_projections``, mapped
    onto these options by ``report.options_for_config``): one grouped decode launch, one base GEMM
    and one LoRA-A GEMM for the group, per-member B GEMMs;
    fused_dequant_gemm (NF4 decoded inside the GEMM at every M: no bf16 W copy; built as
    ``performance.nf4_matmul: fused``), cuda_graphs (a captured step: per-launch host cost -> graph replay
    cost). nf4_chunk_bytes > 0: ``performance.nf4_matmul: chunked`` (above DECODE_MAX_TOKENS each W is
    dequantized in row chunks of about this many 16-bit bytes, each chunk's GEMM run at once; the
    chunk is modelled as staying in L2: its write and re-read cost no HBM bytes).
    fused_add_norm (built, on by default: ``performance.fused_add_norm``) - each layer's attention residual
    add + post-attention RMSNorm as one Triton kernel forward and one backward, and the input
    norm's backward summing its input's residual gradient (with ``kernels``).
    compile (built: ``performance.compile``): ``none | default | reduce-overhead``, each decoder
    layer under torch.compile; the ops of the layer phases (forward, recompute, backward) cost
    ``compiled_launch_us`` (default) or ``graph_launch_us`` (reduce-overhead) per launch on the host,
    the loss and the optimizer stay eager; the launch counts are the eager ones (inductor's
    elementwise fusions are not modelled: conservative), except that a checkpointed layer's
    recompute runs its whole compiled graph (no early stop: down_proj's base matmul and the last
    residual add run again)."""

    system: str = "ours"
    batch: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    lora_r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    kernels: bool = True
    ckpt_every: int = 1
    ckpt_layers: int | None = None
    mlp_chunk: int = 0
    offload: bool = False
    loss_chunk: int = 0
    optimizer: str = "paged_adamw_8bit"
    act_bytes: int = 2
    blocksize: int = 64
    double_quant: bool = True
    clip_grad: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    skip_down_recompute: bool = True
    fused_dequant_gemm: bool = False
    cuda_graphs: bool = False
    fused_add_norm: bool = True
    compile: str = "none"
    nf4_chunk_bytes: int = 0

    def __post_init__(self) -> None:
        if self.system not in ("ours", "hf"):
            raise ValueError(f"StepOptions.system: {self.system!r} is not 'ours' or 'hf'")
        for name in ("batch", "seq_len", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"StepOptions.{name}: must be >= 1 (got {getattr(self, name)})")
        if self.compile not in ("none", "default", "reduce-overhead"):
            raise ValueError(f"StepOptions.compile: {self.compile!r} is not none, default or reduce-overhead")
        if self.ckpt_every < 0 or self.mlp_chunk < 0 or (self.ckpt_layers or 0) < 0:
            raise ValueError("StepOptions: ckpt_every, ckpt_layers and mlp_chunk must be >= 0")

    def checkpointed(self, layers: int) -> int:
        """Decoder layers recomputed in the backward (of ``layers``)."""
        if self.ckpt_layers is not None and self.ckpt_every > 0:
            return max(0, min(layers, self.ckpt_layers))
        return checkpointed_layers(layers, self.ckpt_every)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _targets(arch: ArchSpec, targets) -> set[str]:
    from qlora_trainer.memory.estimate import _targeted

    return {s[0] for s in _targeted(arch, list(targets) if isinstance(targets, tuple) else targets)}


def checkpointed_layers(layers: int, every: int) -> int:
    """Layers recomputed in the backward: one in every ``every`` (0 = none)."""
    return 0 if every <= 0 else -(-layers // every)


# -- ours -------------------------------------------------------------------------------------------

# ``kernels=False`` (``performance.kernels: torch``): the torch references run instead of one Triton launch
# each. (launches, traffic multiple of the Triton kernel's bytes), counted on the CPU in fp32 by a
# dispatch mode (tests/benchmarks/speed/test_counts.py); in 16-bit the RMSNorm reference casts twice more.
REFERENCE = {"rmsnorm.fwd": (6, 3.5), "rmsnorm.bwd": (12, 4.0), "rope.fwd": (10, 4.0), "rope.bwd": (10, 4.0),
             "swiglu.fwd": (2, 1.7), "swiglu.bwd": (3, 2.0), "ce.chunk": (15, 6.0),
             "lora.dropout": (128, 100.0)}  # kernels/dropout.py: Philox in int64 ops (126) + apply (2)
REF_DEQUANT_LAUNCHES = 13     # kernels/nf4.py dequantize_nf4_reference: pair table, scales, one pass (fp32)
REF_DEQUANT_BYTES = 12        # per element beyond the NF4 read and the output write (int32 byte index, in-place scale)


def _kernel(o: StepOptions, name: str, phase: str, read: float, write: float) -> Op:
    """One of our Triton kernels (1 launch, ``read`` + ``write`` elements), or its torch reference."""
    if o.kernels:
        return elementwise(name, phase, read, write, o.act_bytes)
    launches, traffic = REFERENCE[name]
    launches += 2 if name.startswith("rmsnorm") and o.act_bytes != 4 else 0
    return elementwise(name, phase, read * traffic, write * traffic, o.act_bytes, launches=launches)


def _members(name: str) -> int:
    """Projections in a (fused) group: their LoRA A matrices are stacked, (k r, in)."""
    return {"qkv_proj": 3, "gate_up_proj": 2}.get(name, 1)


def _ours_linear(o: StepOptions, phase: str, name: str, m: int, i: int, out: int, lora: bool,
                 skip_base: bool = False) -> list[Op]:
    """One ``LoRALinearFunction`` forward (phase forward/recompute) over m tokens, in -> out. A fused
    group reads x once for its stacked A (k r, in); its B GEMMs total r x out."""
    b, r, ops = o.act_bytes, o.lora_r, []
    ra = r * _members(name)
    fused = o.kernels and (o.fused_dequant_gemm or m <= DECODE_MAX_TOKENS)
    if lora and o.dropout > 0:  # draw_seed (a randint on the device), then x_l = x * k / (1 - p)
        ops += [host("lora.draw_seed", phase, 1), _kernel(o, "lora.dropout", phase, m * i, m * i)]
    k = _members(name)
    if lora and k > 1:  # kernels.grouped_linear: A = cat(A_i) each call (autograd's cat)
        ops.append(elementwise("group.cat_A", phase, ra * i, ra * i, b))
    if lora:
        ops.append(gemm("lora.A", phase, m, i, ra, b))
    if not skip_base:
        ops += _base_matmul(o, phase, name, m, i, out, fused, (out, i))
    if lora:  # one B GEMM per member (o_i summed to out; modelled as k equal parts)
        ops.append(gemm("lora.B", phase, m, r, out / k, b, accumulate=True, count=k))
    return ops


def _base_matmul(o: StepOptions, phase: str, name: str, m: int, k: int, n: int, fused: bool,
                 w_shape: tuple[int, int]) -> list[Op]:
    """(m, k) @ (k, n) against the NF4 weight of shape ``w_shape`` (out, in): k = in (forward) or
    out (dx)."""
    b = o.act_bytes
    if o.kernels and not fused and o.nf4_chunk_bytes > 0 and m > DECODE_MAX_TOKENS:
        return _chunked_matmul(o, phase, name, m, k, n, w_shape)
    if fused:  # the Triton NF4 GEMM decodes W tile by tile: no bf16 copy in HBM
        return [gemm(f"base.{name}.fused", phase, m, k, n, b, w_bytes=nf4_bytes(k * n, o.blocksize, o.double_quant))]
    if not o.kernels:  # the torch reference dequantization
        d = dequant("dequant", phase, k * n, b, blocksize=o.blocksize, double_quant=o.double_quant,
                    launches=REF_DEQUANT_LAUNCHES)
        return [replace(d, bytes=d.bytes + REF_DEQUANT_BYTES * k * n), gemm(f"base.{name}", phase, m, k, n, b)]
    return [dequant("dequant", phase, k * n, b, blocksize=o.blocksize, double_quant=o.double_quant),
            gemm(f"base.{name}", phase, m, k, n, b)]


def _chunked_matmul(o: StepOptions, phase: str, name: str, m: int, k: int, n: int,
                    w_shape: tuple[int, int]) -> list[Op]:
    """``kernels/base_weight.py`` BaseWeight._chunked: per row chunk of W (rows, in), one dequant
    (reads the chunk's NF4 bytes; its 16-bit write stays in L2) and one GEMM reading it from L2:
    forward y[:, rows] = x @ W[rows]^T; dx accumulates dy[:, rows] @ W[rows] into dx (M, in)."""
    from qlora_trainer.kernels.base_weight import chunk_rows

    b, (out_f, in_f) = o.act_bytes, w_shape
    rows = chunk_rows(out_f, in_f, o.blocksize, b, o.nf4_chunk_bytes)
    ops = []
    for r0 in range(0, out_f, rows):
        r = min(rows, out_f - r0)
        d = dequant("dequant", phase, r * in_f, b, blocksize=o.blocksize, double_quant=o.double_quant)
        ops.append(replace(d, bytes=nf4_bytes(r * in_f, o.blocksize, o.double_quant)))
        if not name.endswith(".dx"):  # forward
            ops.append(gemm(f"base.{name}", phase, m, in_f, r, b, w_bytes=0))
        else:
            ops.append(gemm(f"base.{name}", phase, m, r, in_f, b, w_bytes=0, accumulate=r0 > 0))
    return ops


def _ours_linear_backward(o: StepOptions, name: str, m: int, i: int, out: int, lora: bool,
                          need_dx: bool = True) -> list[Op]:
    b, r, ph, ops = o.act_bytes, o.lora_r, "backward", []
    ra = r * _members(name)
    fused = o.kernels and (o.fused_dequant_gemm or m <= DECODE_MAX_TOKENS)
    k = _members(name)  # a group (kernels.grouped_linear): du and dB per member, du and dy concatenated
    if lora:
        ops += [gemm("lora.du", ph, m, out / k, r, b, count=k), elementwise("lora.scale", ph, m * r, m * r, b, count=k)]
        if k > 1:
            ops += [elementwise("group.cat_du", ph, m * ra, m * ra, b), elementwise("group.cat_dy", ph, m * out, m * out, b)]
        ops += [gemm("lora.dB", ph, out / k, m, r, b, count=k),
                elementwise("lora.scale", ph, out * r / k, out * r / k, b, count=k)]
    if need_dx:
        ops += _base_matmul(o, ph, f"{name}.dx", m, out, i, fused, (out, i))
    if lora:
        if o.dropout > 0 and need_dx:  # dx += (du @ A) * k / (1 - p) (one pass), then x_l for dA
            ops += [gemm("lora.dx", ph, m, ra, i, b), _kernel(o, "lora.dropout", ph, 2 * m * i, m * i)]
        elif need_dx:
            ops.append(gemm("lora.dx", ph, m, ra, i, b, accumulate=True))
        if o.dropout > 0 and (o.kernels or not need_dx):
            ops.append(_kernel(o, "lora.dropout", ph, m * i, m * i))
        elif o.dropout > 0:  # the reference reuses the backward's mask: t * k, * 1 / (1 - p)
            ops.append(elementwise("lora.dropout", ph, 2 * m * i, 2 * m * i, b, launches=2))
        ops.append(gemm("lora.dA", ph, ra, m, i, b))
    return ops


def _groups(arch: ArchSpec, o: StepOptions) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """(attention projections, MLP up-projections) as (name, in, out), fused by the options."""
    h, q, kv, inter = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    attn = [("qkv_proj", h, q + 2 * kv)] if o.fused_qkv else [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv)]
    mlp = [("gate_up_proj", h, 2 * inter)] if o.fused_gate_up else [("gate_proj", h, inter), ("up_proj", h, inter)]
    return attn, mlp


def _lora_on(name: str, targets: set[str]) -> bool:
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(name, (name,))
    return any(p in targets for p in parts)


def _ours_layer(arch: ArchSpec, o: StepOptions, phase: str, targets: set[str]) -> list[Op]:
    """A decoder layer's forward (``phase`` forward or recompute; the recompute stops after down_proj)."""
    b, m = o.act_bytes, o.batch * o.seq_len
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attn, _ = _groups(arch, o)
    ops = [_kernel(o, "rmsnorm.fwd", phase, m * h, m * h)]
    for name, i, out in attn:
        ops += _ours_linear(o, phase, name, m, i, out, _lora_on(name, targets))
    if o.fused_qkv and o.kernels:  # q, k are column views of the group's output: the RoPE launcher copies them
        ops.append(elementwise("group.contiguous", phase, m * (q + kv), m * (q + kv), b, launches=2))
    ops += [_kernel(o, "rope.fwd", phase, m * (q + kv), m * (q + kv)),
            attention(phase, o.batch, o.seq_len, arch.heads, arch.kv_heads, arch.head_dim, b),
            elementwise("attn_out.transpose", phase, m * q, m * q, b)]
    ops += _ours_linear(o, phase, "o_proj", m, q, h, _lora_on("o_proj", targets))
    ops += _add_norm(o, phase, m, h)
    chunks = _mlp_chunks(o)
    # tiled: forward runs every chunk; the layer's recompute stops (early stop) once the last
    # chunk's checkpoint has saved its input, so it runs chunks - 1 of them (the chunks' own
    # recomputes in the backward are added by _ours_micro); untiled: once in either phase
    reps = chunks if phase == "forward" or chunks == 1 else chunks - 1
    # those chunks run whole in the layer's recompute (down_proj's output is their output: only
    # the chunk's own recompute may skip it)
    ops += [op.times(reps) for op in _mlp_forward(arch, o, phase, targets, whole=chunks > 1)]
    if chunks > 1:
        ops.append(elementwise("mlp.cat", phase, m * h, m * h, b))
    if phase == "forward" or o.compile != "none":  # early stop: the eager recompute never reaches
        # the last residual add; a compiled layer is one graph, recomputed whole
        ops.append(elementwise("residual.add", phase, 2 * m * h, m * h, b))
    return ops


def _add_norm(o: StepOptions, phase: str, m: int, h: int) -> list[Op]:
    """The attention residual add + post-attention RMSNorm over m tokens (``phase`` backward: their
    gradient). Fused (``kernels.rmsnorm.add_rms_norm``): one kernel, forward reads x, r and writes s, y;
    backward reads dy, ds_out, s and writes ds. Else the add and the norm; backward the norm's and
    the sum of the two gradients of s. The input norm's backward is the same (its input's two
    gradients: the norm's and the residual branch's; its forward is a plain RMSNorm)."""
    b = o.act_bytes
    if o.kernels and o.fused_add_norm:
        if phase == "backward":
            return [elementwise("add_rmsnorm.bwd", phase, 3 * m * h, m * h, b)]
        return [elementwise("add_rmsnorm.fwd", phase, 2 * m * h, 2 * m * h, b)]
    if phase == "backward":
        return [_kernel(o, "rmsnorm.bwd", phase, 2 * m * h, m * h), elementwise("grad.accumulate", phase, 2 * m * h, m * h, b)]
    return [elementwise("residual.add", phase, 2 * m * h, m * h, b), _kernel(o, "rmsnorm.fwd", phase, m * h, m * h)]


def _mlp_forward(arch: ArchSpec, o: StepOptions, phase: str, targets: set[str], whole: bool = False) -> list[Op]:
    """One MLP forward over one chunk (the whole sequence when untiled). ``whole``: a recompute that
    runs down_proj's base matmul too (a tiled chunk inside its layer's recompute)."""
    chunks = _mlp_chunks(o)
    mc = o.batch * min(o.seq_len, o.mlp_chunk) if chunks > 1 else o.batch * o.seq_len
    _, mlp = _groups(arch, o)
    ops = []
    for name, i, out in mlp:
        ops += _ours_linear(o, phase, name, mc, i, out, _lora_on(name, targets))
    if o.fused_gate_up and o.kernels:  # gate, up: column views, copied by the SwiGLU launcher
        ops.append(elementwise("group.contiguous", phase, 2 * mc * arch.intermediate, 2 * mc * arch.intermediate,
                               o.act_bytes, launches=2))
    ops.append(_kernel(o, "swiglu.fwd", phase, 2 * mc * arch.intermediate, mc * arch.intermediate))
    skip = phase == "recompute" and o.skip_down_recompute and o.compile == "none" and not whole  # compiled: no early stop
    return ops + _ours_linear(o, phase, "down_proj", mc, arch.intermediate, arch.hidden,
                              _lora_on("down_proj", targets), skip_base=skip)


def _mlp_chunks(o: StepOptions) -> int:
    return -(-o.seq_len // o.mlp_chunk) if 0 < o.mlp_chunk < o.seq_len else 1


def _ours_layer_backward(arch: ArchSpec, o: StepOptions, targets: set[str], first: bool = False) -> list[Op]:
    """A layer's backward. ``first``: the first layer, whose input (the frozen embedding's output)
    needs no gradient: no dx for q/k/v, no input-norm backward, no residual accumulation."""
    b, m, ph = o.act_bytes, o.batch * o.seq_len, "backward"
    h, q, kv, inter = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    attn, mlp = _groups(arch, o)
    chunks = _mlp_chunks(o)
    mc = o.batch * min(o.seq_len, o.mlp_chunk) if chunks > 1 else m
    grad_add = elementwise("grad.accumulate", ph, 2 * m * h, m * h, b)
    ops: list[Op] = []
    mo = _ours_linear_backward(o, "down_proj", mc, inter, h, _lora_on("down_proj", targets))
    mo.append(_kernel(o, "swiglu.bwd", ph, 3 * mc * inter, 2 * mc * inter))
    for name, i, out in reversed(mlp):
        mo += _ours_linear_backward(o, name, mc, i, out, _lora_on(name, targets))
    mo += [elementwise("grad.accumulate", ph, 2 * mc * h, mc * h, b)] * (len(mlp) - 1)
    ops += [op.times(chunks) for op in mo]
    ops += _add_norm(o, ph, m, h)   # dh1: skip + MLP branch, through the post-attention norm
    ops += _ours_linear_backward(o, "o_proj", m, q, h, _lora_on("o_proj", targets))
    ops += [attention(ph, o.batch, o.seq_len, arch.heads, arch.kv_heads, arch.head_dim, b, backward=True),
            _kernel(o, "rope.bwd", ph, m * (q + kv), m * (q + kv))]
    for name, i, out in reversed(attn):
        ops += _ours_linear_backward(o, name, m, i, out, _lora_on(name, targets), need_dx=not first)
    if not first:  # the q/k/v input gradients summed, the input norm, dx: skip + attention branch
        ops += [grad_add] * (len(attn) - 1) + _add_norm(o, ph, m, h)  # fused: the input norm sums dx
    return ops


def _ours_loss(arch: ArchSpec, o: StepOptions) -> list[Op]:
    from qlora_trainer.kernels.cross_entropy import auto_chunk_size

    b, h, v = o.act_bytes, arch.hidden, arch.vocab
    n = o.batch * (o.seq_len - 1)
    c = min(n, o.loss_chunk or auto_chunk_size(n, v, h))
    ops: list[Op] = [host("loss.setup", "loss", 4 + (o.act_bytes != 4))]  # labels copy, zeros, (y != -100).sum
    if o.batch > 1:                                                   # hidden[:, :-1] is not a view
        ops.append(elementwise("loss.hidden_copy", "loss", n * h, n * h, b))
    for s in range(0, n, c):
        rows = min(c, n - s)
        ops += [gemm("lm_head.logits", "loss", rows, h, v, b), _kernel(o, "ce.chunk", "loss", rows * v, rows * v),
                gemm("lm_head.dh", "loss", rows, v, h, b), host("loss.sum", "loss", 2)]
    ops.append(elementwise("loss.dh_scale", "loss", n * h, n * h, b, launches=1 + (b != 4)))
    return ops


def _ours_micro(arch: ArchSpec, o: StepOptions) -> list[Op]:
    targets = _targets(arch, o.targets)
    b, m, h = o.act_bytes, o.batch * o.seq_len, arch.hidden
    ck = o.checkpointed(arch.layers)
    ops = [elementwise("embedding", "forward", m * h, m * h, b), host("rotary+mask", "forward", 8)]
    ops += [op.times(arch.layers) for op in _ours_layer(arch, o, "forward", targets)]
    ops.append(_kernel(o, "rmsnorm.fwd", "forward", m * h, m * h))
    ops += _ours_loss(arch, o)
    ops.append(_kernel(o, "rmsnorm.bwd", "backward", 2 * m * h, m * h))
    if ck:
        ops += [op.times(ck) for op in _ours_layer(arch, o, "recompute", targets)]
        ops.append(host("checkpoint.rng", "recompute", 2, count=2 * ck))
    if _mlp_chunks(o) > 1:  # each chunk's own checkpoint recomputes it in the backward
        ops += [op.times(_mlp_chunks(o) * arch.layers) for op in _mlp_forward(arch, o, "recompute", targets)]
        ops.append(host("checkpoint.rng", "recompute", 2, count=2 * _mlp_chunks(o) * arch.layers))
    if o.offload and ck:
        ops.append(Op("offload.h2d", "transfer", "recompute", bytes=float(m * h * b), count=ck))
    ops += _ours_layer_backward(arch, o, targets, first=True)
    ops += [op.times(arch.layers - 1) for op in _ours_layer_backward(arch, o, targets)]
    ops.append(host("loop.loss", "loss", 3))                               # /n, ones_like, +=
    return ops


# -- the HF stack ------------------------------------------------------------------------------------

def _hf_linear(o: StepOptions, phase: str, m: int, i: int, out: int, last: bool = False) -> list[Op]:
    """bnb Linear4bit (fp32 in -> bf16 -> fp32 out) + PEFT fp32 LoRA (x@A^T, @B^T, *s, +).
    ``last``: the layer's last linear in a recompute, where torch's early stop ends the recompute
    once lora_B's input is saved (autograd saves inputs before the kernel runs): no B, *s, +."""
    r, ops = o.lora_r, []
    ops.append(elementwise("hf.cast_in", phase, m * i * 3, 0, 2))       # read fp32, write bf16
    ops += [dequant("dequant.bnb", phase, i * out, 2, kind="dequant_bnb", launches=3, host_calls=1,
                    blocksize=o.blocksize, double_quant=o.double_quant),
            gemm("base", phase, m, i, out, 2),
            elementwise("hf.cast_out", phase, m * out * 3, 0, 2),            # read bf16, write fp32
            elementwise("hf.clone", phase, m * out, m * out, 4)]              # PEFT's defensive clone
    if o.dropout > 0:
        ops.append(elementwise("lora.dropout", phase, m * i, m * i * 1.25, 4))
    ops.append(gemm("lora.A.fp32", phase, m, i, r, 4, kind="gemm_fp32"))
    if not last:
        ops += [gemm("lora.B.fp32", phase, m, r, out, 4, kind="gemm_fp32"),
                elementwise("lora.scale+add", phase, 3 * m * out, 2 * m * out, 4, launches=2)]
    return ops


def _hf_linear_backward(o: StepOptions, m: int, i: int, out: int) -> list[Op]:
    r, ph = o.lora_r, "backward"
    ops = [elementwise("lora.scale", ph, m * out, m * out, 4),
           gemm("lora.dB.fp32", ph, out, m, r, 4, kind="gemm_fp32"), gemm("lora.du.fp32", ph, m, out, r, 4, kind="gemm_fp32"),
           gemm("lora.dA.fp32", ph, r, m, i, 4, kind="gemm_fp32"), gemm("lora.dx.fp32", ph, m, r, i, 4, kind="gemm_fp32")]
    if o.dropout > 0:
        ops.append(elementwise("lora.dropout", ph, m * i * 1.25, m * i, 4))
    ops += [elementwise("hf.cast_out", ph, m * out * 3, 0, 2),
            dequant("dequant.bnb", ph, i * out, 2, kind="dequant_bnb", launches=3, host_calls=1,
                    blocksize=o.blocksize, double_quant=o.double_quant),
            gemm("base.dx", ph, m, out, i, 2), elementwise("hf.cast_in", ph, m * i * 3, 0, 2),
            elementwise("grad.accumulate", ph, 2 * m * i, m * i, 4)]
    return ops


def _hf_layer(arch: ArchSpec, o: StepOptions, phase: str) -> list[Op]:
    m, h, inter = o.batch * o.seq_len, arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norm = elementwise("hf.rmsnorm.fwd", phase, 4 * m * h, 3 * m * h, 4, launches=6)
    ops = [norm]
    for i, out in ((h, q), (h, kv), (h, kv)):
        ops += _hf_linear(o, phase, m, i, out)
    ops += [elementwise("hf.rope.fwd", phase, 5 * m * (q + kv), 4 * m * (q + kv), 4, launches=10),
            attention(phase, o.batch, o.seq_len, arch.heads, arch.kv_heads, arch.head_dim, 4),
            elementwise("attn_out.transpose", phase, m * q, m * q, 4)]
    ops = [op if op.kind != "attention" else _fp32(op) for op in ops]
    ops += _hf_linear(o, phase, m, q, h)
    ops += [elementwise("residual.add", phase, 2 * m * h, m * h, 4), norm]
    for _ in range(2):
        ops += _hf_linear(o, phase, m, h, inter)
    ops.append(elementwise("hf.silu*up", phase, 3 * m * inter, 2 * m * inter, 4, launches=2))
    ops += _hf_linear(o, phase, m, inter, h, last=phase == "recompute")
    if phase == "forward":
        ops.append(elementwise("residual.add", phase, 2 * m * h, m * h, 4))
    return ops


def _fp32(op: Op) -> Op:
    return replace(op, kind="attention_fp32" if op.kind == "attention" else op.kind)


def _hf_layer_backward(arch: ArchSpec, o: StepOptions) -> list[Op]:
    m, h, inter, ph = o.batch * o.seq_len, arch.hidden, arch.intermediate, "backward"
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    add = elementwise("grad.accumulate", ph, 2 * m * h, m * h, 4)
    norm = elementwise("hf.rmsnorm.bwd", ph, 8 * m * h, 5 * m * h, 4, launches=10)
    ops = [add] + _hf_linear_backward(o, m, inter, h)
    ops.append(elementwise("hf.silu*up.bwd", ph, 5 * m * inter, 3 * m * inter, 4, launches=3))
    ops += _hf_linear_backward(o, m, h, inter) * 2 + [add, norm, add]
    ops += _hf_linear_backward(o, m, q, h)
    ops += [_fp32(attention(ph, o.batch, o.seq_len, arch.heads, arch.kv_heads, arch.head_dim, 4, backward=True)),
            elementwise("hf.rope.bwd", ph, 7 * m * (q + kv), 5 * m * (q + kv), 4, launches=14)]
    for i, out in ((h, kv), (h, kv), (h, q)):
        ops += _hf_linear_backward(o, m, i, out)
    return ops + [add, add, norm]


def _hf_micro(arch: ArchSpec, o: StepOptions) -> list[Op]:
    m, h, v = o.batch * o.seq_len, arch.hidden, arch.vocab
    ck = o.checkpointed(arch.layers)
    ops = [elementwise("embedding", "forward", m * h, m * h, 4), host("rotary+mask", "forward", 8)]
    ops += [op.times(arch.layers) for op in _hf_layer(arch, o, "forward")]
    ops += [elementwise("hf.rmsnorm.fwd", "forward", 4 * m * h, 3 * m * h, 4, launches=6),
            gemm("lm_head.fp32", "loss", m, h, v, 4, kind="gemm_fp32"),
            elementwise("loss.log_softmax+nll", "loss", 2 * m * v, m * v, 4, launches=6),
            elementwise("loss.backward", "loss", 3 * m * v, 2 * m * v, 4, launches=4),
            gemm("lm_head.dx.fp32", "loss", m, v, h, 4, kind="gemm_fp32"),
            elementwise("hf.rmsnorm.bwd", "backward", 8 * m * h, 5 * m * h, 4, launches=10)]
    if ck:
        ops += [op.times(ck) for op in _hf_layer(arch, o, "recompute")]
        ops.append(host("checkpoint.rng", "recompute", 2, count=2 * ck))
    ops += [op.times(arch.layers) for op in _hf_layer_backward(arch, o)]
    return ops


# -- the step ----------------------------------------------------------------------------------------

def lora_tensors(arch: ArchSpec, o: StepOptions) -> list[int]:
    """Element counts of every trainable LoRA tensor (A and B of each targeted linear, all layers)."""
    from qlora_trainer.memory.estimate import _targeted

    t = list(o.targets) if isinstance(o.targets, tuple) else o.targets
    per_layer = [n for _, i, out, _ in _targeted(arch, t) for n in (o.lora_r * i, out * o.lora_r)]
    return per_layer * arch.layers


def _optimizer(arch: ArchSpec, o: StepOptions) -> list[Op]:
    sizes = lora_tensors(arch, o)
    pb = 2 if o.system == "ours" else 4                        # ours: bf16 adapters; PEFT: fp32
    n, ph = len(sizes), "optimizer"
    ops: list[Op] = []
    if o.grad_accum > 1:                                        # micro-batches 2.. add into .grad
        ops += [elementwise("grad.accumulate", ph, 2 * s, s, pb, count=o.grad_accum - 1) for s in sizes]
    if o.clip_grad:
        ops.append(elementwise("clip_grad_norm", ph, 2 * sum(sizes), sum(sizes), pb, launches=6))
    state = 2 if "8bit" in o.optimizer else 8                   # two moments, 1 or 4 bytes each
    ops += [Op("adamw.update", "optimizer", ph, bytes=float(s * (3 * pb + 2 * state)), launches=1,
               host_calls=1 if o.optimizer != "adamw" else 0) for s in sizes]
    if o.optimizer == "adamw":                                  # torch's foreach AdamW: a few launches per group
        ops = [op if op.name != "adamw.update" else Op(op.name, op.kind, ph, bytes=op.bytes, launches=0) for op in ops]
        ops.append(host("adamw.foreach", ph, 12 * max(1, n // 512)))
    return ops


def step_ops(arch: ArchSpec, o: StepOptions) -> list[Op]:
    """Every op of one optimizer step: ``grad_accum`` micro-batches + the optimizer (merged)."""
    return list(_step_ops(arch, o))


@functools.lru_cache(maxsize=256)
def _step_ops(arch: ArchSpec, o: StepOptions) -> tuple[Op, ...]:
    micro = _ours_micro(arch, o) if o.system == "ours" else _hf_micro(arch, o)
    ops = [op.times(o.grad_accum) for op in micro] + _optimizer(arch, o)
    return tuple(merge_ops(ops))


__all__ = ["DECODE_MAX_TOKENS", "StepOptions", "checkpointed_layers", "lora_tensors", "step_ops"]
