"""Grouped projections: several frozen linears that read the same x (q/k/v, gate/up) as one GEMM.

For members i = 1..k with frozen W_i (o_i, in), bias b_i, adapters A_i (r_i, in), B_i (o_i, r_i)
and scales s_i (no dropout: grouping needs one adapter input for all members)::

    W = [W_1; ...; W_k] (O, in),  A = [A_1; ...; A_k] (R, in)      O = Σ o_i, R = Σ r_i
    u = x A^T (M, R)                                               one GEMM, x read once
    y = x W^T + b,  y[:, o_i] += s_i u[:, r_i] B_i^T (M, O)        one GEMM + k small ones
Backward with dy (M, O), dy_i = dy[:, o_i]::
    dB_i = s_i dy_i^T u_i (o_i, r_i),  du_i = s_i dy_i B_i (M, r_i)   du = [du_1 ... du_k] (M, R)
    dA   = du^T x (R, in)                                          one GEMM (split by autograd's cat)
    dx   = dy W + du A (M, in)                                     two GEMMs in all (not 2k)
W is rebuilt in the backward (NF4 members decode into the rows of one (O, in) buffer in one call:
one dequant launch, one buffer, one GEMM), never saved; saved: x (M, in), u (M, R), A (R, in), the B_i.

:class:`GroupWeight` is built once per group and cached on the owning module (:func:`group_weight`),
rebuilt when a member's cached ``BaseWeight`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base_weight import BaseWeight, count
from .nf4 import NF4Weight, dequantize_nf4_group, nf4_groupable


@dataclass(frozen=True, eq=False)
class GroupWeight:
    """Members' frozen weights stacked along the output axis: W (O, in), bias (O,) or None."""

    members: tuple[BaseWeight, ...]
    outs: tuple[int, ...]
    bias: torch.Tensor | None

    @classmethod
    def build(cls, members: tuple[BaseWeight, ...]) -> "GroupWeight":
        outs = tuple(bw.shape[0] for bw in members)
        bias = None
        if any(bw.bias is not None for bw in members):
            ref = next(bw.bias for bw in members if bw.bias is not None)
            bias = torch.cat([bw.bias.detach() if bw.bias is not None else ref.new_zeros(o)
                              for bw, o in zip(members, outs)])
        return cls(members=members, outs=outs, bias=bias)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W (O, in) in ``dtype``, one transient buffer: NF4 members decode in one call
        (``nf4.dequantize_nf4_group``: one Triton launch, one COUNTS dequant), others write their rows."""
        first = self.members[0]
        dev = first.nf4.packed.device if first.nf4 is not None else first.dense.device
        w = torch.empty(sum(self.outs), first.shape[1], dtype=dtype, device=dev)
        if self.nf4_members is not None:
            count("dequant")
            return dequantize_nf4_group(self.nf4_members, w, backend=first.backend)
        for bw, rows in zip(self.members, w.split(self.outs)):
            bw.weight_into(rows)
        return w

    @property
    def nf4_members(self) -> tuple[NF4Weight, ...] | None:
        """The members' NF4 weights when all are NF4 and one grouped decode takes them, else None."""
        ws = tuple(bw.nf4 for bw in self.members)
        return ws if all(w is not None for w in ws) and nf4_groupable(ws) else None  # type: ignore[return-value]

    def forward_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) -> x W^T + bias (M, O)."""
        count("forward")
        w = self.weight(x.dtype)
        if self.bias is None:
            return x @ w.t()
        return torch.addmm(self.bias.to(x.dtype), x, w.t())

    def backward_matmul(self, dy: torch.Tensor) -> torch.Tensor:
        """dy (M, O) -> dy W (M, in)."""
        count("dx")
        return dy @ self.weight(dy.dtype)


class GroupedLoRAFunction(torch.autograd.Function):
    """forward(x (..., in), A (R, in), group, scales, ranks, *B_i (o_i, r_i)) -> y (..., O)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, group: GroupWeight, scales: tuple[float, ...],
                ranks: tuple[int, ...], *lora_Bs: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        u = x2 @ lora_A.to(x.dtype).t()  # (M, R)
        y = group.forward_matmul(x2)  # (M, O)
        for y_i, u_i, b, s in zip(y.split(group.outs, 1), u.split(ranks, 1), lora_Bs, scales):
            y_i.addmm_(u_i, b.to(x.dtype).t(), alpha=s)
        ctx.save_for_backward(x2, u, lora_A, *lora_Bs)
        ctx.group, ctx.scales, ctx.ranks = group, scales, ranks
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, u, lora_A, *lora_Bs = ctx.saved_tensors
        group, scales, ranks = ctx.group, ctx.scales, ctx.ranks
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(u.dtype).contiguous()  # (M, O)
        a = lora_A.to(u.dtype)
        dys = dy2.split(group.outs, 1)  # dy_i (M, o_i)
        du = torch.cat([(dy_i @ b.to(u.dtype)).mul_(s) for dy_i, b, s in zip(dys, lora_Bs, scales)], 1)  # (M, R)
        d_bs = [(dy_i.t() @ u_i).mul_(s).to(b.dtype) if ctx.needs_input_grad[5 + i] else None
                for i, (dy_i, u_i, b, s) in enumerate(zip(dys, u.split(ranks, 1), lora_Bs, scales))]
        dx = d_a = None
        if ctx.needs_input_grad[0]:
            dx = group.backward_matmul(dy2).addmm_(du, a).view(*lead, x2.shape[-1])  # (M, in)
        if ctx.needs_input_grad[1]:
            d_a = (du.t() @ x2).to(lora_A.dtype)  # (R, in)
        return (dx, d_a, None, None, None, *d_bs)


def group_weight(owner: torch.nn.Module, name: str, members: tuple[BaseWeight, ...]) -> GroupWeight:
    """The :class:`GroupWeight` of ``members`` cached on ``owner`` under ``name`` (rebuilt when any
    member's cached BaseWeight object changes).

    While torch.compile traces, a cached group is returned unchecked, as ``base_weight`` does: ``id()``
    and ``is`` would make dynamo guard on each layer's objects by identity, so every decoder layer
    would compile a graph of its own (and past dynamo's recompile limit run eagerly)."""
    if torch.compiler.is_compiling():
        hit = owner.__dict__.get(f"_qlora_group_{name}")
        if hit is not None:
            return hit[1]
    return _group_weight_eager(owner, name, members)


@torch.compiler.disable
def _group_weight_eager(owner: torch.nn.Module, name: str, members: tuple[BaseWeight, ...]) -> GroupWeight:
    attr = f"_qlora_group_{name}"
    key = tuple(id(m) for m in members)
    hit = owner.__dict__.get(attr)
    if hit is not None and hit[0] == key and all(a is b for a, b in zip(hit[2], members)):
        return hit[1]
    gw = GroupWeight.build(members)
    owner.__dict__[attr] = (key, gw, members)
    return gw


# The groups the model's layers form (``grouped_projections`` call sites): name -> member attributes.
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj")))


def warm_groups(model: torch.nn.Module) -> int:
    """Build and cache the :class:`GroupWeight` of every :data:`GROUPS` group under ``model`` whose
    members can group (as :func:`grouped_projections` would), so that compiled code finds it;
    returns how many. Run after the members' base weights are cached."""
    n = 0
    for owner in model.modules():
        for name, attrs in GROUPS:
            mods = [getattr(owner, a, None) for a in attrs]
            gets = [getattr(m, "grouping_operands", None) for m in mods]
            ops = [g() for g in gets] if all(callable(g) for g in gets) else [None]
            if any(op is None for op in ops) or len({(op[0].backend, op[0].shape[1]) for op in ops}) != 1:
                continue
            group_weight(owner, name, tuple(op[0] for op in ops))
            n += 1
    return n


def grouped_lora_linear(x: torch.Tensor, group: GroupWeight, lora_As: list[torch.Tensor],
                        lora_Bs: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """[x W_i^T + b_i + s_i (x A_i^T) B_i^T for each member] (..., o_i) via one
    :class:`GroupedLoRAFunction` (A concatenated by autograd's cat, so each A_i gets its rows)."""
    a = torch.cat([t.to(lora_As[0].dtype) for t in lora_As]) if len(lora_As) > 1 else lora_As[0]
    ranks = tuple(t.shape[0] for t in lora_As)
    y = GroupedLoRAFunction.apply(x, a, group, tuple(scales), ranks, *lora_Bs)
    return list(y.split(group.outs, dim=-1))


def grouped_projections(x: torch.Tensor, owner: torch.nn.Module, name: str,
                        modules: tuple[torch.nn.Module, ...]) -> list[torch.Tensor] | None:
    """The outputs of ``modules`` (each reading ``x`` (..., in)) as one grouped matmul, or None when
    they cannot be grouped: a member without ``grouping_operands()`` or whose answer is None
    (no/merged/DoRA adapter, active dropout, a base the kernels do not read), mixed backends or
    input sizes, or a member whose matmul for these tokens is not dequant + cuBLAS
    (``BaseWeight.path``: few tokens on the Triton backend, where the fused dequant-in-GEMM per
    member reads 4x fewer weight bytes, or a ``fused``/``chunked`` large-M path).
    ``grouping_operands()`` -> (BaseWeight, A, B, scale)."""
    ops = []
    for m in modules:
        get = getattr(m, "grouping_operands", None)
        op = get() if callable(get) else None
        if op is None:
            return None
        ops.append(op)
    bws = tuple(op[0] for op in ops)
    if len({(bw.backend, bw.shape[1]) for bw in bws}) != 1:
        return None
    m_tokens = x.numel() // max(x.shape[-1], 1)
    if any(bw.path(m_tokens) != "dequant" for bw in bws):
        return None
    gw = group_weight(owner, name, bws)
    return grouped_lora_linear(x, gw, [op[1] for op in ops], [op[2] for op in ops], [op[3] for op in ops])
