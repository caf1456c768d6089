"""The fused linear GRPO loss: the clipped surrogate from the final hidden states, never holding the logits.

Today's RL loss projects the completion tokens' hidden states h [N, D] onto the vocabulary (logits [N, V]),
runs the fused log-prob/entropy op, then the surrogate; autograd keeps the logits and writes their gradient,
each N x V. Here one op (``eagrl::fused_linear_policy_loss``) walks the rows in chunks of C. Per chunk:

1. logits_c = h_c Wᵀ [C, V] (the output layer W [V, D]), divided by the temperature T;
2. log-prob, entropy and log-sum-exp of the sampled tokens (the Triton kernels, or PyTorch);
3. the surrogate per token (``eagrl.rl.grpo.clipped_surrogate``'s semantics, per-token ε_high = ε(τ)):
   r = exp(logp − logp_old); ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·k3(ref, logp); L = Σ w·ℓ;
4. its gradient, known once log-p is: dL/dlogp = w·(−A·r·[not clipped] + β·(1 − exp(ref − logp))), where
   "clipped" is (A > 0 and r > 1 + ε_high) or (A < 0 and r < 1 − ε_low); then
   dL/dlogits_c = dL/dlogp · (onehot − p) / T (entropy carries no gradient: ε(τ) is detached), and
   dL/dh_c = dL/dlogits_c · W, dL/dW += dL/dlogits_cᵀ · h_c (only when W is trained; with LoRA it is frozen).

The backward only scales the stored dL/dh (and dL/dW) by the upstream gradient of the loss. Peak extra
memory is a few C x V buffers plus dL/dh [N, D], whatever N. ``register_fake`` gives the shapes for tracing, so
the loss compiles with ``torch.compile(fullgraph=True)`` without a graph break.

Outputs a model's logits only through a plain linear layer: a scale (``logit_scale``, Cohere) is folded into
the temperature, and a soft-capping (Gemma-2's ``final_logit_softcapping``) or a bias is refused
(``output_layer``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from eagrl.errors import EAGRLInputError

STATS = ("clip_low", "clip_high", "ratio", "kl")
DEFAULT_CHUNK_ELEMENTS = 1 << 25  # rows per chunk: C·V ≈ 32 M logits (128 MiB in fp32)


def default_chunk(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab``: C·V about ``DEFAULT_CHUNK_ELEMENTS``."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


def output_layer(model) -> tuple[torch.Tensor, float]:
    """``(W [V, D], scale)`` of ``model``'s output layer, where logits = scale · h Wᵀ. A bias or a soft-capping
    is one clear error (the fused linear loss assumes a plain linear layer)."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if getattr(head, "bias", None) is not None:
        raise EAGRLInputError("loss_backend fused_linear: the model's output layer has a bias; use loss_backend auto, triton or torch")
    if getattr(config, "final_logit_softcapping", None):
        raise EAGRLInputError(
            f"loss_backend fused_linear: {type(model).__name__} soft-caps its logits (final_logit_softcapping); "
            "use loss_backend auto, triton or torch"
        )
    return head.weight, float(getattr(config, "logit_scale", None) or 1.0)


def surrogate_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    eps_low: float,
    eps_high: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For C tokens ([C] each): the weighted loss sum, dL/dlogp [C] and the statistics' sums [4]
    (clip_low, clip_high, ratio, kl over the tokens with weight > 0)."""
    ratio = torch.exp(logp - old_logp)  # [C]
    upper = 1.0 + eps_high  # [C]
    clipped_ratio = torch.minimum(torch.clamp(ratio, min=1.0 - eps_low), upper)
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # [C]
    high = (ratio > upper) & (advantages > 0)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    grad = -advantages * ratio * (~(high | low)).float()  # [C]
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0  # k3
        per_token = per_token + kl_coef * kl
        grad = grad + kl_coef * (1.0 - torch.exp(delta))
    counted = (weights > 0).float()
    stats = torch.stack([(low.float() * counted).sum(), (high.float() * counted).sum(), (ratio * counted).sum(), (kl * counted).sum()])
    return (per_token * weights).sum(), grad * weights, stats


def _chunk_torch(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """PyTorch path of one chunk: ``(logp, entropy, make_grad)`` where ``make_grad(g)`` [C] -> dL/dlogits [C, V]
    (fp32), overwriting the chunk's probabilities in place (a few C x V buffers in all)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 in the tests)
    x = x / temperature if temperature != 1.0 else x  # [C, V]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [C, 1]
    log_p = x.sub_(lse)  # [C, V], in place
    p = torch.exp(log_p)  # [C, V]
    entropy = -torch.einsum("cv,cv->c", p, log_p)  # [C], a row-wise dot: no C x V product
    rows = torch.arange(len(ids), device=ids.device)
    logp = log_p[rows, ids]  # [C]
    del log_p, x

    def make_grad(g: torch.Tensor) -> torch.Tensor:
        grad = p.mul_(-g[:, None])  # −g·p
        grad[rows, ids] += g  # + g at the sampled id
        return grad.div_(temperature) if temperature != 1.0 else grad

    return logp, entropy, make_grad


def _chunk_triton(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """Triton path of one chunk (the fused kernels: forward, then the backward with g_H = g_lse = 0)."""
    from eagrl.kernels import triton_kernels

    logits = logits.contiguous()
    logp, entropy, lse = triton_kernels.forward(logits, ids, temperature)

    def make_grad(g: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(lse)
        return triton_kernels.backward(logits, ids, lse, entropy, g.contiguous(), zeros, zeros, temperature)

    return logp, entropy, make_grad


@torch.library.custom_op("eagrl::fused_linear_policy_loss", mutates_args=())
def _fused_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    agg_weights: torch.Tensor,
    eps_high: torch.Tensor,
    ref_logp: torch.Tensor,
    eps_low: float,
    kl_coef: float,
    temperature: float,
    chunk_size: int,
    use_triton: bool,
    old_is_current: bool,
    use_ref: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, device = hidden.shape[0], hidden.device
    compute = torch.promote_types(hidden.dtype, torch.float32)
    loss = torch.zeros((), dtype=compute, device=device)
    stats = torch.zeros(len(STATS), dtype=compute, device=device)
    logp_all = torch.empty(n, dtype=compute, device=device)
    entropy_all = torch.empty(n, dtype=compute, device=device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=compute, device=device) if weight_grad else hidden.new_zeros(0)
    chunk = _chunk_triton if use_triton else _chunk_torch
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        h = hidden[rows]  # [C, D]
        logits = h @ weight.t()  # [C, V]
        logp, entropy, make_grad = chunk(logits, ids[rows], temperature)
        del logits
        logp, entropy = logp.to(compute), entropy.to(compute)
        cast = lambda t: t[rows].to(compute)  # noqa: E731
        old = logp if old_is_current else cast(old_logp)
        part, g, part_stats = surrogate_terms(
            logp, old, cast(advantages), cast(agg_weights), eps_low, cast(eps_high), cast(ref_logp) if use_ref else None, kl_coef
        )
        loss += part
        stats += part_stats
        logp_all[rows], entropy_all[rows] = logp, entropy
        grad_logits = make_grad(g)  # [C, V]
        grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)  # [C, D]
        if weight_grad:
            grad_weight += grad_logits.to(compute).t() @ h.to(compute)  # [V, D]
        del grad_logits
    counted = (agg_weights > 0).float().sum().clamp_min(1.0)
    return loss, logp_all, entropy_all, stats / counted, grad_hidden, grad_weight.to(weight.dtype) if weight_grad else grad_weight


@_fused_linear.register_fake
def _(hidden, weight, ids, old_logp, advantages, agg_weights, eps_high, ref_logp, eps_low, kl_coef, temperature, chunk_size,
      use_triton, old_is_current, use_ref, weight_grad):  # fmt: skip
    n, compute = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
    scalar = hidden.new_empty((), dtype=compute)
    per_row = lambda: hidden.new_empty((n,), dtype=compute)  # noqa: E731
    grad_weight = torch.empty_like(weight) if weight_grad else hidden.new_empty((0,))
    return scalar, per_row(), per_row(), hidden.new_empty((len(STATS),), dtype=compute), torch.empty_like(hidden), grad_weight


def _setup_context(ctx, inputs, output) -> None:
    *_, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.weight_grad = inputs[-1]


def _backward(ctx, grad_loss, *_unused):
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_loss.to(grad_hidden.dtype)
    return (grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype) if ctx.weight_grad else None, *([None] * 14))


_fused_linear.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    agg_weights: torch.Tensor,
    eps_high: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    eps_low: float,
    kl_coef: float,
    temperature: float,
    path: Literal["triton", "torch"] = "torch",
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, logp, entropy, stats)`` of the clipped surrogate for final hidden states ``hidden`` [N, D] and the
    output layer ``weight`` [V, D] (logits = hidden · weightᵀ, then / ``temperature``); the [N] tensors as in
    ``eagrl.rl.grpo.policy_loss`` (``old_logp`` None: this forward's, detached; ``ref_logp`` used when
    ``kl_coef`` > 0). Differentiable w.r.t. ``hidden``, and ``weight`` when it requires grad. ``path``: the
    per-chunk log-prob/entropy (a resolved ``eagrl.kernels.resolve_backend`` path). ``chunk_size``: rows per
    chunk (None: ``default_chunk``). logp and entropy are detached; stats as ``clipped_surrogate``'s."""
    n = hidden.shape[0]
    as_rows = lambda t: t.reshape(n)  # noqa: E731
    use_ref = ref_logp is not None and kl_coef > 0
    placeholder = advantages.new_zeros(n)
    loss, logp, entropy, stats, _, _ = _fused_linear(
        hidden, weight, ids, placeholder if old_logp is None else as_rows(old_logp), as_rows(advantages), as_rows(agg_weights),
        as_rows(eps_high), as_rows(ref_logp) if use_ref else placeholder, float(eps_low), float(kl_coef), float(temperature),
        int(chunk_size or default_chunk(weight.shape[0])), path == "triton", old_logp is None, use_ref, bool(weight.requires_grad),
    )  # fmt: skip
    return loss, logp.detach(), entropy.detach(), dict(zip(STATS, stats.detach().unbind()))


def unfused_policy_loss(hidden, weight, ids, old_logp, advantages, agg_weights, eps_high, ref_logp, eps_low, kl_coef, temperature):
    """Today's path (the tests' and the benchmark's baseline): the logits [N, V], then ``eagrl.rl.grpo.policy_loss`` on
    the PyTorch reference op."""
    from eagrl.rl.grpo import policy_loss

    return policy_loss(hidden @ weight.t(), ids, old_logp, advantages, agg_weights, eps_high, ref_logp, eps_low, kl_coef, temperature, "torch")
