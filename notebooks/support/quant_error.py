"""Blockwise 4-bit quantization error: NF4 vs FP4 (bitsandbytes) vs Int4 absmax (a few torch lines).

All three split a weight into blocks of ``blocksize`` values and store one absmax constant per
block. With double quantization (QLoRA §3) the fp32 constants are themselves quantized to 8 bits in
blocks of 256 (after subtracting their mean), which cuts the constants' overhead from
``32 / 64 = 0.5`` to ``8 / 64 + 32 / (64 * 256) ≈ 0.127`` bits per parameter.

NF4 and FP4 are quantized by ``bitsandbytes.functional.quantize_4bit`` and decoded by our reference
(``kernels.nf4``: ``code[nibble] * scale``, the same layout for both kinds), never by bitsandbytes'
CPU ``dequantize_4bit``, which mis-indexes the block scales on AVX512 CPUs when ``in_features`` is not a
multiple of the block size (docs/bitsandbytes-cpu.md) and so would make the numbers depend on the
CPU. Int4 and its double quantization use ``quantize_blockwise`` for the constants exactly as
bitsandbytes does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("nf4", "fp4", "int4")


@dataclass(frozen=True)
class QuantError:
    """Error of one quantize -> dequantize round trip.

    mse: mean squared error. rel_rmse: RMS error / RMS weight. mae: mean absolute error.
    const_bits: bits per parameter spent on the quantization constants (absmax, double-quant state).
    """

    kind: str
    double_quant: bool
    mse: float
    rel_rmse: float
    mae: float
    const_bits: float


def _int4_roundtrip(w: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, float]:
    """Symmetric Int4 absmax: q = round(7 * x / absmax) in [-7, 7] per block.

    Args:
        w: any shape; numel divisible by ``blocksize``.
    Returns:
        (dequantized weight like ``w``, constant bits per parameter).
    """
    import bitsandbytes.functional as F

    blocks = w.float().reshape(-1, blocksize)                      # (nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)              # (nblocks,)
    q = torch.round(blocks / absmax[:, None] * 7).clamp_(-7, 7)    # int levels
    n = w.numel()
    if double_quant:
        offset = absmax.mean()
        qa, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        absmax = F.dequantize_blockwise(qa, state2) + offset
        bits = (qa.numel() * 8 + state2.absmax.numel() * 32 + 32) / n
    else:
        bits = absmax.numel() * 32 / n
    return (q * absmax[:, None] / 7).reshape(w.shape).to(w.dtype), bits


def _bnb_roundtrip(w: torch.Tensor, kind: str, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, float]:
    """NF4 or FP4 through bitsandbytes; constant bits measured from the returned ``QuantState``."""
    import bitsandbytes.functional as F

    import copy

    from qlora_trainer.kernels.nf4 import NF4Weight, dequantize_nf4_reference

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=kind)
    layout = copy.copy(state)  # FP4 shares NF4's layout; ``state.code`` holds the kind's 16 levels
    layout.quant_type = "nf4"
    out = dequantize_nf4_reference(NF4Weight.from_bnb(packed, layout))
    bits = state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8 + 32  # + fp32 offset
    return out, bits / w.numel()


def roundtrip(w: torch.Tensor, kind: str, *, blocksize: int = 64, double_quant: bool = False
              ) -> tuple[torch.Tensor, float]:
    """Quantize ``w`` to 4 bits with ``kind`` (``nf4|fp4|int4``) and dequantize it.

    Args:
        w: weight of any shape (numel divisible by ``blocksize``), fp32/bf16/fp16.
    Returns:
        (dequantized tensor of ``w``'s shape and dtype, constant bits per parameter).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if w.numel() % blocksize:
        raise ValueError(f"weight numel {w.numel()} is not a multiple of blocksize {blocksize}")
    if kind == "int4":
        return _int4_roundtrip(w, blocksize, double_quant)
    return _bnb_roundtrip(w, kind, blocksize, double_quant)


def quant_error(w: torch.Tensor, kind: str, *, blocksize: int = 64, double_quant: bool = False) -> QuantError:
    """Round-trip ``w`` and measure the error (see :class:`QuantError`)."""
    deq, bits = roundtrip(w, kind, blocksize=blocksize, double_quant=double_quant)
    err = deq.float() - w.float()
    mse = err.pow(2).mean().item()
    return QuantError(kind=kind, double_quant=double_quant, mse=mse,
                      rel_rmse=(mse / w.float().pow(2).mean().item()) ** 0.5,
                      mae=err.abs().mean().item(), const_bits=bits)


def error_table(weights: dict[str, torch.Tensor], *, blocksize: int = 64,
                kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """One row per (weight set, kind, double_quant): the fields of :class:`QuantError` + ``weights``.

    ``weights`` maps a label to a tensor; pass several tensors concatenated (``torch.cat`` of flattened
    weights) to pool a model's layers. Rows are plain dicts (easy to show as a table or a DataFrame).
    """
    rows = []
    for label, w in weights.items():
        for kind in kinds:
            for dq in (False, True):
                e = quant_error(w, kind, blocksize=blocksize, double_quant=dq)
                rows.append({"weights": label, **e.__dict__})
    return rows


def model_linear_weights(model: torch.nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> torch.Tensor:
    """All ``nn.Linear`` weights of ``model`` (except ``skip``) flattened into one 1-D fp32 tensor,
    trimmed to a multiple of 4096 values (so any blocksize up to 4096 divides it)."""
    parts = [m.weight.detach().float().flatten() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith(skip)]
    if not parts:
        raise ValueError("model has no nn.Linear layers to measure")
    flat = torch.cat(parts)
    return flat[: flat.numel() // 4096 * 4096]


@torch.no_grad()
def quantized_copy(model: torch.nn.Module, kind: str, *, blocksize: int = 64, double_quant: bool = True,
                   skip: tuple[str, ...] = ("lm_head",), seed: int | None = None) -> torch.nn.Module:
    """A deep copy of ``model`` whose ``nn.Linear`` weights (except ``skip``) are replaced by their
    4-bit round trip (simulated quantization: the same numbers ``Linear4bit`` dequantizes to in its
    forward, for all three kinds alike). Used to compare the kinds by the model's loss, the paper's
    metric, rather than by weight error alone. ``seed``: quantize each weight with its input columns
    in a random order (then restore it), so that other values share a block: another realization of
    the same kind's rounding error (None: the stored order)."""
    import copy

    out = copy.deepcopy(model)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for name, m in out.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith(skip):
            w = m.weight.data
            perm = None if gen is None else torch.randperm(w.shape[1], generator=gen)
            deq, _ = roundtrip(w if perm is None else w[:, perm].contiguous(), kind, blocksize=blocksize,
                               double_quant=double_quant)
            m.weight.data.copy_(deq if perm is None else deq[:, torch.argsort(perm)])
    return out


# The paper's Table 2: mean Pile-CC perplexity over 125M-13B models (FP4 is E2M1, bitsandbytes' FP4).
PAPER_PERPLEXITY = {"int4": 34.34, "fp4": 31.07, "nf4": 27.41}


@torch.no_grad()
def window_losses(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each window (W, T) separately: (W,) fp32, eval mode."""
    import torch.nn.functional as F

    was = model.training
    model.eval()
    logits = model(windows).logits[:, :-1].float()                       # (W, T-1, V), V = 260 bytes
    loss = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (W, T-1)
    model.train(was)
    return loss.mean(dim=1)


def perplexity_table(model: torch.nn.Module, windows: torch.Tensor, *, blocksize: int = 64,
                     double_quant: bool = True, seeds: tuple[int | None, ...] = (None,)) -> list[dict]:
    """Held-out perplexity of ``model`` (16-bit) and of its NF4 / FP4 / Int4 round trips, averaged over
    the quantization realizations ``seeds`` (:func:`quantized_copy`), with the paper's Table 2
    perplexity for reference. Per kind: ``delta_loss`` (mean loss difference from 16-bit),
    ``delta_se`` (its standard error: over windows, paired with 16-bit, and over seeds; see
    :func:`difference`) and ``window_deltas`` ((S, W) loss differences per seed and window, for
    paired comparisons between kinds)."""
    import math

    base = window_losses(model, windows)
    rows = [{"kind": "16-bit", "loss": base.mean().item(), "perplexity": math.exp(base.mean().item()),
             "delta_loss": 0.0, "delta_se": 0.0, "paper_perplexity": float("nan"),
             "window_deltas": torch.zeros(len(seeds), base.numel())}]
    for kind in KINDS:
        d = torch.stack([window_losses(quantized_copy(model, kind, blocksize=blocksize, double_quant=double_quant,
                                                      seed=s), windows) - base for s in seeds])  # (S, W)
        loss = base.mean().item() + d.mean().item()
        rows.append({"kind": kind, "loss": loss, "perplexity": math.exp(loss), "delta_loss": d.mean().item(),
                     "delta_se": _two_way_se(d), "paper_perplexity": PAPER_PERPLEXITY[kind], "window_deltas": d})
    return rows


def _two_way_se(d: torch.Tensor) -> float:
    """Standard error of the mean of ``d`` (S seeds, W windows): window-to-window and seed-to-seed
    spread added in quadrature (a seed's error is shared by its windows, a window's by its seeds)."""
    import math

    s, w = d.shape
    by_window = d.mean(dim=0).var().item() / w if w > 1 else 0.0
    by_seed = d.mean(dim=1).var().item() / s if s > 1 else 0.0
    return math.sqrt(by_window + by_seed)


def difference(rows: list[dict], a: str, b: str) -> tuple[float, float]:
    """(mean, standard error) of kind ``a``'s held-out loss minus kind ``b``'s, paired over the same
    windows and seeds (rows from :func:`perplexity_table`)."""
    by_kind = {r["kind"]: r["window_deltas"] for r in rows}
    d = by_kind[a] - by_kind[b]
    return d.mean().item(), _two_way_se(d)
