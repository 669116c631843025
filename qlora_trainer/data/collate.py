"""Batches: dynamic padding, a length-grouped batch sampler, and packing without cross-attention.

Packing choice (transformers 5.x): a packed block carries ``position_ids`` that restart at 0 for each
sample and **no** ``attention_mask``. ``masking_utils.create_causal_mask`` detects the restarts
(``find_packed_sequence_indices``) and builds the block-diagonal causal mask for the configured
attention backend itself: a boolean 4-D mask for SDPA, an additive one for eager, varlen kernels for
flash-attention. The detection only runs without a KV cache: call the model with ``use_cache=False``.
An explicit 4-D mask from here would suit only one backend (eager adds it to the scores, so a boolean
one is wrong there) and costs B·T² memory on the host. :func:`block_causal_mask`
builds that explicit mask for callers that want it. The first label of every packed sample is -100 so
no token learns to predict across a sample boundary. Padding after the last sample of a block forms
its own segment (positions 0, 1, ...) with labels -100.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Sampler

from qlora_trainer.data import preference
from qlora_trainer.data.formats import IGNORE_INDEX

if TYPE_CHECKING:
    from qlora_trainer.config import DataConfig


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def pad_collate(samples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. Returns input_ids (B,T) long, labels (B,T) with -100 on padding,
    attention_mask (B,T) long (1 = real token)."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.as_tensor(s["input_ids"])
        labels[b, :n] = torch.as_tensor(s["labels"])
        attn[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def pack_collate(blocks: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each block is a list of samples laid end to end. Returns input_ids (B,T), labels (B,T) (first
    label of every sample and all padding -100), position_ids (B,T) restarting at 0 per sample."""
    rows = []
    for block in blocks:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for s in block:
            n = len(s["input_ids"])
            ids += s["input_ids"]
            labels += [IGNORE_INDEX] + list(s["labels"][1:])
            pos += list(range(n))
        rows.append((ids, labels, pos))
    T = max(len(r[0]) for r in rows)
    out = {k: torch.full((len(rows), T), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", IGNORE_INDEX))}
    out["position_ids"] = torch.arange(T).repeat(len(rows), 1)
    for b, (ids, labels, pos) in enumerate(rows):
        n = len(ids)
        out["input_ids"][b, :n] = torch.as_tensor(ids)
        out["labels"][b, :n] = torch.as_tensor(labels)
        out["position_ids"][b, :n] = torch.as_tensor(pos)
        out["position_ids"][b, n:] = torch.arange(T - n)
    return out


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids (B,T) restarting at 0 per sample -> bool mask (B,1,T,T), True = may attend
    (same sample and not in the future)."""
    seg = (position_ids == 0).cumsum(-1)                      # (B,T) sample index of each token
    same = seg[:, :, None] == seg[:, None, :]                 # (B,T,T)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def pack_indices(lengths: Sequence[int], seq_len: int, order: Sequence[int]) -> list[list[int]]:
    """Next-fit packing of samples (in ``order``) into blocks of at most ``seq_len`` tokens."""
    blocks: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if cur and used + n > seq_len:
            blocks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        blocks.append(cur)
    return blocks


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length samples: shuffle, cut into mega-batches of ``batch_size·mega``,
    sort each by length (longest first), split into batches, shuffle the batches. Deterministic for
    ``(seed, epoch)``."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int = 0, mega: int = 32):
        self.lengths, self.batch_size, self.seed, self.epoch, self.mega = list(lengths), batch_size, seed, epoch, mega

    def _batches(self) -> list[list[int]]:
        g = _generator(self.seed, self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        batches = []
        for k in range(0, len(perm), size):
            chunk = sorted(perm[k: k + size], key=lambda i: -self.lengths[i])
            batches += [chunk[j: j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class _Packed(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, blocks: list[list[int]]):
        self.dataset, self.blocks = dataset, blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> list[dict[str, list[int]]]:
        return [self.dataset[j] for j in self.blocks[i]]


def make_dataloader(dataset: Any, *, cfg: "DataConfig", tokenizer: Any, batch_size: int, shuffle: bool,
                    seed: int, epoch: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader over ``{input_ids, labels}`` rows, deterministic for ``(seed, epoch)``.

    Batches: ``input_ids`` (B,T) long, ``labels`` (B,T) (-100 = no loss) and either ``attention_mask``
    (B,T) (padded batches) or, with ``cfg.pack``, ``position_ids`` (B,T) restarting per sample and no
    attention mask (see the module docstring).

    Data parallel (``world`` > 1): rank ``rank`` reads its shard of the epoch's global order
    (:func:`shard_order`) and packs or length-groups only that shard; every rank yields the same
    number of batches (the shortest shard's count, computed alike on every rank), so ranks step together.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = partial(pad_collate, pad_id=pad_id)
    if preference.is_preference(dataset):  # pairs / unpaired examples: their own rows and batches
        lengths, collate = preference.row_lengths(dataset), preference.collate_for(dataset, pad_id)
    else:
        lengths = _lengths(dataset)
    per_rank = [_rank_batches(lengths, shard_order(len(lengths), seed=seed, epoch=epoch, shuffle=shuffle,
                                                   rank=r, world=world), cfg, batch_size, seed, epoch, shuffle, world)
                for r in range(world)]
    batches = per_rank[rank][: min(len(b) for b in per_rank)]
    if cfg.pack:  # batches of blocks, consecutive: the DataLoader's batching re-forms them
        blocks = [block for batch in batches for block in batch]
        return DataLoader(_Packed(dataset, blocks), batch_size=batch_size, shuffle=False,
                          collate_fn=partial(pack_collate, pad_id=pad_id))
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate)


def shard_order(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1) -> list[int]:
    """Rank ``rank``'s sample indices for ``epoch``: the global order (a ``(seed, epoch)`` permutation,
    or 0..n-1 unshuffled; the same for every ``world``) cut to a multiple of ``world`` and strided,
    ``order[rank::world]`` (one rank: the whole order). Striding keeps each step's samples the same
    set however many ranks share it: without packing or length grouping, a W-rank step of
    ``grad_accum`` micro-batches of B reads exactly the samples of a one-rank step of
    ``W * grad_accum`` micro-batches of B. Up to W-1 samples per epoch are left out to keep shards equal."""
    order = torch.randperm(n, generator=_generator(seed, epoch)).tolist() if shuffle else list(range(n))
    if world == 1:
        return order
    return order[: n - n % world][rank::world]


def _rank_batches(lengths: Sequence[int], order: list[int], cfg: "DataConfig", batch_size: int, seed: int,
                  epoch: int, shuffle: bool, world: int) -> list[list[Any]]:
    """One rank's batches over its shard ``order``: lists of sample indices, or with ``cfg.pack``
    lists of blocks (each block a list of sample indices)."""
    if cfg.pack:
        blocks = pack_indices(lengths, cfg.seq_len, order)
        return [blocks[i: i + batch_size] for i in range(0, len(blocks), batch_size)]
    if cfg.group_by_length and shuffle:  # the sampler shuffles; a single rank groups the whole set
        shard = order if world > 1 else list(range(len(lengths)))
        sampler = LengthGroupedBatchSampler([lengths[i] for i in shard], batch_size, seed=seed, epoch=epoch)
        return [[shard[j] for j in b] for b in sampler]
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _lengths(dataset: Any) -> list[int]:
    try:
        return [len(x) for x in dataset["input_ids"]]  # datasets.Dataset: one column read
    except (TypeError, KeyError, IndexError):
        return [len(s["input_ids"]) for s in dataset]
