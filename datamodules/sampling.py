"""Data loaders whose order depends only on the seed and the epoch, never on the global random state.

A run resumed from a checkpoint then visits the patients in the order the uninterrupted run would have,
and no loader draws from the global torch generator that dropout and sampling use. Lightning calls
``set_epoch`` on the sampler before every epoch (and swaps in a ``DistributedSampler`` under DDP).

A fit resumed from a checkpoint written inside an epoch (an RL run checkpoints after every rollout) restarts the
epoch's loader from its first batch while its step count goes on from the checkpoint's; ``EpochShuffle`` then skips
the batches the checkpoint had already trained on (``resumed_batches``), so no patient of that epoch is seen twice
and none is missed. The order is read when the trainer first starts the epoch's loader: in the main process, after
the restore (a worker process would read it at the loader's creation, which a schedule that asks for
``estimated_stepping_batches`` brings before the restore: the epoch and progress would be the new trainer's).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from eagrl.distributed import rank, world_size


def run_seed() -> int:
    """The seed of ``seed_everything`` (Lightning keeps it in ``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffle(DistributedSampler):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone; under several processes, rank r
    takes its elements r, r + N, ... (padded, as ``DistributedSampler`` does, to equal shares).

    So N ranks' batch b hold together the batch b of one process with N times the batch size. It is a
    ``DistributedSampler``, so Lightning does not wrap it in one of its own (which would shuffle again).
    The epoch is ``epoch_of()`` when given and not None (the trainer's), else the last ``set_epoch``.
    ``skip_of()``, when given: how many of this rank's samples of the epoch to leave out at its start (those a
    resumed fit has trained on already). ``__len__`` stays the whole share, as the trainer counts the epoch's
    batches from its first.
    """

    def __init__(
        self, data: Sized, seed: int | None = None, epoch_of: Callable[[], int | None] | None = None, skip_of: Callable[[], int] | None = None
    ):
        # DistributedSampler's own __init__ needs the process group: the ranks are read when iterating
        self.n = len(data)
        self.seed_value = seed
        self.epoch = 0
        self.epoch_of = epoch_of
        self.skip_of = skip_of

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        seed = run_seed() if self.seed_value is None else self.seed_value
        current = self.epoch_of() if self.epoch_of is not None else None
        epoch = self.epoch if current is None else current
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        world = world_size()
        if world > 1:
            order += order[: (-len(order)) % world]  # equal shares
            order = order[rank() :: world]
        skip = self.skip_of() if self.skip_of is not None else 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return -(-self.n // world_size())


def resumed_batches(trainer: Any) -> int:
    """The batches of the current epoch trained on before its loader is (re)started: those a fit resumed from a
    checkpoint written inside the epoch had trained on (Lightning's restored progress), 0 at an epoch's start or
    outside ``fit``. Read when the loader starts, before the epoch's first batch: its batches ready then."""
    from lightning.pytorch.trainer.states import TrainerFn

    state = getattr(trainer, "state", None)
    if state is None or state.fn != TrainerFn.FITTING:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def make_loader(
    data: Any,
    batch_size: int,
    shuffle: bool,
    collate_fn: Callable,
    num_workers: int = 0,
    epoch_of: Callable[[], int | None] | None = None,
    done_of: Callable[[], int] | None = None,
) -> DataLoader:
    """A DataLoader with a private generator (worker seeds) and, when shuffling, an ``EpochShuffle``.

    Under DDP Lightning gives rank r the samples r, r + N, ... of that order (without shuffling them
    again), so N ranks of batch b see together the batch of N·b one process would see. ``done_of()``: the batches
    of the epoch already trained on when a fit resumes inside it (``resumed_batches``), which the shuffle skips."""
    skip_of = (lambda: done_of() * batch_size) if done_of is not None else None  # noqa: E731
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=EpochShuffle(data, epoch_of=epoch_of, skip_of=skip_of) if shuffle else None,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(run_seed()),
    )


class BatchShard(Sampler[list[int]]):
    """Rank ``rank`` of ``world``'s share of the sequential batches of ``range(n)``: batches r, r + world, ...

    Whole batches, not samples, are sharded, so every batch holds the patients it holds in one process
    (distillation seeds each batch's search by its index: the merged output equals one process's).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        self.batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)][rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
