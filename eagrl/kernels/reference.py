"""The pure-PyTorch reference of the fused token log-prob/entropy op (METHOD.md §5).

It is the oracle of the kernel tests and the path used wherever Triton cannot run (a CPU without
``TRITON_INTERPRET=1``). Semantics, shared with the Triton kernels, for logits z [N, V] of any float
dtype (computed in fp32), sampled ids y [N] and temperature T:

- x = z / T; lse = logsumexp(x); logp = x_y − lse; H = −Σ p log p with p = softmax(x).
- ``-inf`` logits have p = 0 and add nothing to H (no 0·(−inf) = NaN).
- A row with no finite logit (a fully masked position) gives logp = 0, H = 0, lse = −inf and a zero
  gradient: it is a position that does not exist, not an error.
- Backward, for upstream gradients g_logp, g_H and g_lse of one row:
  dz_j = [g_logp (δ_jy − p_j) − g_H p_j (log p_j + H) + g_lse p_j] / T.
"""

from __future__ import annotations

import torch


def token_logp_entropy_reference(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)``, each [N] float32 (float64 for float64 logits: the tests' oracle),
    differentiable w.r.t. ``logits`` [N, V]."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [N, V]
    alive = torch.isfinite(x.amax(dim=-1))  # [N] rows with a finite logit
    x = torch.where(alive[:, None], x, torch.zeros_like(x))  # masked rows: finite stand-ins, no NaN gradients
    lse = torch.logsumexp(x, dim=-1)  # [N]
    log_p = x - lse[:, None]  # [N, V]
    p = torch.exp(log_p)  # [N, V]
    finite_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0·(−inf) := 0, in value and gradient
    entropy = torch.where(alive, -(p * finite_log_p).sum(-1), torch.zeros_like(lse))  # [N]
    picked = log_p.gather(-1, ids.long()[:, None]).squeeze(-1)  # [N]
    logp = torch.where(alive, picked, torch.zeros_like(picked))
    lse = torch.where(alive, lse, torch.full_like(lse, float("-inf")))
    return logp, entropy, lse


def token_logp_entropy_backward_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_lse: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """dL/dlogits [N, V] in the dtype of ``logits``, from the saved ``lse``/``entropy`` [N] (the formula above)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(compute) / temperature  # [N, V]
    alive = torch.isfinite(lse)  # [N]
    safe_lse = torch.where(alive, lse, torch.zeros_like(lse))
    log_p = x - safe_lse[:, None]  # [N, V]
    p = torch.where(alive[:, None], torch.exp(log_p), torch.zeros_like(x))  # [N, V]
    plogp_h = torch.where(p > 0, p * (log_p + entropy[:, None]), torch.zeros_like(p))  # [N, V]
    onehot = torch.zeros_like(x).scatter_(-1, ids.long()[:, None], 1.0)  # [N, V]
    g_logp, g_entropy, g_lse = (g.to(compute)[:, None] for g in (grad_logp, grad_entropy, grad_lse))
    grad = g_logp * (onehot - p) - g_entropy * plogp_h + g_lse * p  # [N, V]
    grad = torch.where(alive[:, None], grad, torch.zeros_like(grad)) / temperature
    return grad.to(logits.dtype)
