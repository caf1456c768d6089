"""``token_logp_entropy``: the fused op behind the RL loss, with a switch between the Triton kernels and
the pure-PyTorch reference.

The Triton path is two ``torch.library.custom_op``s (``eagrl::token_logp_entropy`` and its backward
``eagrl::token_logp_entropy_backward``) with ``register_fake`` (shapes for tracing) and
``register_autograd`` (the backward op), so a loss built on it compiles with
``torch.compile(fullgraph=True)`` and zero graph breaks, on a GPU and, with ``TRITON_INTERPRET=1``, on a
CPU. Memory: the forward keeps three floats per row; nothing of size N x V is made until the backward
writes the gradient of the logits (eager ``log_softmax`` makes several N x V fp32 copies).

``backend``: ``"triton"`` forces the kernels (an ``EAGRLInputError`` where they cannot run), ``"torch"``
forces the reference, ``"auto"`` takes the kernels where they can run (CUDA, or ``TRITON_INTERPRET=1``)
and the reference elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from eagrl.errors import EAGRLInputError
from eagrl.kernels.reference import token_logp_entropy_reference

Backend = Literal["auto", "triton", "torch"]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton is installed and the device is a CUDA GPU,
    or the kernels are interpreted on the CPU (``TRITON_INTERPRET=1``)."""
    if not triton_installed():
        return False
    device = torch.device(device)
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: Backend, device: torch.device | str) -> Literal["triton", "torch"]:
    """The path ``backend`` means on ``device``; ``"triton"`` where it cannot run is one clear error."""
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_runs_on(device):
            why = "Triton is not installed" if not triton_installed() else f"the device is {torch.device(device)} (no CUDA) and TRITON_INTERPRET is not 1"
            raise EAGRLInputError(f"loss backend 'triton' cannot run here: {why}; use backend 'auto' or 'torch'")
        return "triton"
    if backend == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    raise EAGRLInputError(f"loss backend must be one of auto, triton, torch; got {backend!r}")


def _kernels():
    from eagrl.kernels import triton_kernels  # imported on first use: triton.jit reads TRITON_INTERPRET then

    return triton_kernels


@torch.library.custom_op("eagrl::token_logp_entropy", mutates_args=())
def _fused(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().forward(logits, ids, temperature)


@_fused.register_fake
def _(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    rows = logits.shape[0]
    new = lambda: logits.new_empty((rows,), dtype=torch.float32)  # noqa: E731
    return new(), new(), new()


@torch.library.custom_op("eagrl::token_logp_entropy_backward", mutates_args=())
def _fused_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_lse: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    return _kernels().backward(logits, ids, lse, entropy, grad_logp, grad_entropy, grad_lse, temperature)


@_fused_backward.register_fake
def _(logits, ids, lse, entropy, grad_logp, grad_entropy, grad_lse, temperature):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, ids, temperature = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, ids, lse, entropy)
    ctx.temperature = temperature


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    logits, ids, lse, entropy = ctx.saved_tensors
    zeros = lambda: torch.zeros_like(lse)  # noqa: E731  an output nobody used
    grad_logp = zeros() if grad_logp is None else grad_logp.contiguous()
    grad_entropy = zeros() if grad_entropy is None else grad_entropy.contiguous()
    grad_lse = zeros() if grad_lse is None else grad_lse.contiguous()
    grad = _fused_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, grad_lse, ctx.temperature)
    return grad, None, None


_fused.register_autograd(_backward, setup_context=_setup_context)


def check_ids(ids: torch.Tensor, vocab: int) -> None:
    """Every sampled id must index a column of the logits: the kernel reads ``logits[row, id]`` unchecked."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) (the logits' vocabulary), got [{int(ids.min())}, {int(ids.max())}]")


def token_logp_entropy(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)`` per row of ``logits`` [N, V] (float32/bf16/fp16; fp32 results) for the
    sampled ``ids`` [N] at ``temperature``; differentiable w.r.t. ``logits`` on both paths. Checks the ids'
    range and resolves ``backend`` (use ``token_logp_entropy_on`` with a resolved path inside a compiled region)."""
    if logits.dim() != 2 or ids.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and ids [N], got {tuple(logits.shape)} and {tuple(ids.shape)}")
    check_ids(ids, logits.shape[1])
    return token_logp_entropy_on(resolve_backend(backend, logits.device), logits, ids, temperature)


def token_logp_entropy_on(
    path: Literal["triton", "torch"], logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_logp_entropy`` on a path already resolved (``resolve_backend``), with no check that reads the
    data or the environment: what a ``torch.compile(fullgraph=True)`` region calls."""
    if path == "torch":
        return token_logp_entropy_reference(logits, ids, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _fused(logits, ids, float(temperature))
