"""Data loaders whose order depends only on the seed and the epoch, never on the global random state.

A run resumed from a checkpoint then visits the patients in the order the uninterrupted run would have,
and no loader draws from the global torch generator that dropout and sampling use. Lightning calls
``set_epoch`` on the sampler before every epoch (and swaps in a ``DistributedSampler`` under DDP).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Sampler


def run_seed() -> int:
    """The seed of ``seed_everything`` (Lightning keeps it in ``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone."""

    def __init__(self, data: Sized, seed: int | None = None):
        self.n = len(data)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        seed = run_seed() if self.seed is None else self.seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(data: Any, batch_size: int, shuffle: bool, collate_fn: Callable, num_workers: int = 0) -> DataLoader:
    """A DataLoader with a private generator (worker seeds) and, when shuffling, an ``EpochShuffle``."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=EpochShuffle(data) if shuffle else None,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(run_seed()),
    )
