"""What the stages need from several processes (DDP, FSDP): evaluation on every sample exactly once.

Under a distributed sampler each rank sees a shard of the evaluation split, padded with repeated samples
so that the shards have equal length. Metrics are computed after the shards are gathered, the repeats
dropped and the samples put back in dataset order, so an N-process evaluation gives exactly the
metrics (bootstrap included) of a 1-process one.

``check_scale_out`` refuses, before any work, a strategy or process count a stage does not support
(``STRATEGY_SUPPORT``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from eagrl.errors import EAGRLInputError


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


# Which stages run under which family of Lightning strategies (README: "Running on a cluster").
STRATEGY_SUPPORT = {
    "single": None,  # every stage
    "ddp": None,  # every stage: ddp, ddp_spawn, ddp_fork, DDPStrategy(...)
    "fsdp": ("SFTModule",),  # shards a large backbone under LoRA; RL sums its LoRA gradients itself (DDP only)
}


def _strategy_family(strategy: Any) -> str:
    """``single``, ``ddp``, ``fsdp`` or the name given, from a strategy string or a class_path config."""
    if strategy is None:
        return "single"
    name = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else strategy)
    name = str(name).rsplit(".", 1)[-1].lower().replace("strategy", "")
    if name in ("auto", "single_device", "singledevice", "single_xla"):
        return "single"
    for family in ("fsdp", "ddp"):
        if name.startswith(family):
            return family
    return name


def check_scale_out(config: Any) -> None:
    """Refuse, before any work, a strategy a stage does not support, QLoRA under FSDP, more CPU processes
    than cores, and a fixed training subset that the world size does not divide."""
    trainer, model, data = config.get("trainer"), config.get("model"), config.get("data")
    stage = str(getattr(model, "class_path", "") or "").rsplit(".", 1)[-1]
    family = _strategy_family(trainer.get("strategy"))
    if family not in STRATEGY_SUPPORT or (STRATEGY_SUPPORT[family] is not None and stage not in STRATEGY_SUPPORT[family]):
        supported = ", ".join(f for f, stages in STRATEGY_SUPPORT.items() if stages is None or stage in stages)
        raise EAGRLInputError(f"trainer.strategy: {stage or 'this stage'} does not run under {family!r}; it supports: {supported}")
    args = getattr(model, "init_args", None) or {}
    backbone = args.get("backbone") if hasattr(args, "get") else None
    if family == "fsdp" and backbone is not None and getattr(backbone, "quantization", None) == "nf4":
        raise EAGRLInputError("model.backbone.quantization: nf4 (QLoRA) runs with DDP only, not FSDP: use strategy ddp, or quantization none")
    if family == "fsdp" and hasattr(args, "get") and args.get("save_merged", True):
        raise EAGRLInputError("model.save_merged: the merged export needs the whole backbone on one GPU; under FSDP set it false (configs/scale/sft_fsdp.yaml)")
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes") or 1)
    accelerator = str(trainer.get("accelerator") or "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 1 and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        cores = os.cpu_count() or 1
        if devices > cores:
            raise EAGRLInputError(f"trainer.devices: {devices} processes asked for, this machine has {cores} CPU cores")
    world = devices * nodes if isinstance(devices, int) and devices > 0 else None
    data_args = getattr(data, "init_args", None) or {}
    train_patients = data_args.get("train_patients") if hasattr(data_args, "get") else None
    if world and world > 1 and train_patients and train_patients % world:
        raise EAGRLInputError(
            f"data.train_patients: {train_patients} patients do not split evenly over {world} processes "
            f"(devices {devices} x num_nodes {nodes}); use a multiple of {world}"
        )
