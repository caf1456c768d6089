"""What the stages need from several processes (DDP, FSDP): evaluation on every sample exactly once.

Under a distributed sampler each rank sees a shard of the evaluation split, padded with repeated samples
so that the shards have equal length. Metrics are computed after the shards are gathered, the repeats
dropped and the samples put back in dataset order, so an N-process evaluation gives exactly the
metrics (bootstrap included) of a 1-process one.
"""

from __future__ import annotations

from typing import Any

import torch


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def unique_in_order(index: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort ``columns`` by the dataset ``index`` and keep the first row of each index (drops DDP padding)."""
    index = index.flatten().long()
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    chosen = order[keep]
    return (index[chosen], *(column.flatten()[chosen] for column in columns))


def unique_records(records: list[dict[str, Any]], position: dict[str, int]) -> list[dict[str, Any]]:
    """``records`` of every rank, one per ``id``, in dataset order (``position``: id -> place in the split)."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        seen.setdefault(str(record["id"]), record)
    return sorted(seen.values(), key=lambda r: position[str(r["id"])])


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` reduced over every rank (``sum``, ``min`` or ``max``); unchanged in a single process.
    Gloo and NCCL both take the tensor on its own device."""
    if world_size() == 1:
        return values
    reduced = values.clone()
    torch.distributed.all_reduce(reduced, op={"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}[op])
    return reduced


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every rank's gradients by their sum over the ranks (one collective; a missing gradient is zero)."""
    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1).float() for g in grads]))
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
