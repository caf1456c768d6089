"""One policy update over a rollout batch (METHOD.md §4), independent of Lightning.

``optimise`` runs ``ppo_epochs`` passes over a ``Rollout``, each one optimiser step: per prompt, the
completions' logits with the prompt computed once (``completion_logits``), the loss (``policy_loss``:
fused log-prob/entropy op + clipped surrogate, token-mean over the rollout batch), the backward, and,
after every prompt of the pass, gradient clipping and the step.

Rollout log-probs: the first pass's own (detached), taken before any update, so no separate forward is
needed. EAG-RL's ε(τ) must be known before a prompt's loss: with one prompt per batch it comes from
that prompt's forward (the entropies are read from the logits first); with several prompts a no-grad
pass over the batch runs first (it also gives the rollout log-probs), so ε(τ) is normalised over the
whole batch. A KL penalty adds a no-grad pass of the model with its LoRA adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from eagrl.distributed import all_reduce, sum_gradients, world_size
from eagrl.kernels import token_logp_entropy
from eagrl.rl.grpo import Rollout, clip_high_from_entropy, masked_mean, policy_loss
from eagrl.rl.rollout import completion_logits


@dataclass(frozen=True)
class UpdateConfig:
    """Settings of a policy update (the RL module's arguments of the same names)."""

    ppo_epochs: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.2
    adaptive_clip: bool = True
    eps_min: float = 0.2
    eps_max: float = 0.4
    kl_coef: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    backend: str = "auto"


def _device(model) -> torch.device:
    return model.get_output_embeddings().weight.device


def _group_tensors(rollout: Rollout, p: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-token tensors [N_p] of prompt p's completions: advantage, key mask, trajectory index in the group."""
    group = rollout.group_size
    rows = range(p * group, (p + 1) * group)
    lengths = torch.tensor([len(rollout.completions[b]) for b in rows])
    segments = torch.repeat_interleave(torch.arange(group), lengths)  # [N_p]
    key = torch.tensor([k for b in rows for k in rollout.key_mask[b]], dtype=torch.bool)  # [N_p]
    advantages = rollout.advantages[p * group : (p + 1) * group].float()[segments]  # [N_p]
    return {"segments": segments.to(device), "key": key.to(device), "advantages": advantages.to(device)}


def _logits(model, rollout: Rollout, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    group = rollout.group_size
    return completion_logits(model, rollout.prompt_ids[p], rollout.completions[p * group : (p + 1) * group])


@torch.no_grad()
def score(model, rollout: Rollout, config: UpdateConfig, reference: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, ``(logp, entropy)`` [N_p] under the policy (``reference``: with the adapter disabled)."""
    out = []
    for p in range(len(rollout.prompt_ids)):
        if reference:
            with model.disable_adapter():
                logits, ids = _logits(model, rollout, p)
        else:
            logits, ids = _logits(model, rollout, p)
        logp, entropy, _ = token_logp_entropy(logits, ids, config.temperature, config.backend)
        out.append((logp, entropy))
    return out


def clip_bounds(rollout: Rollout, entropies: list[torch.Tensor], config: UpdateConfig, device: torch.device | None = None) -> torch.Tensor:
    """ε(τ) [B] from per-prompt token entropies [N_p]: each trajectory's mean over its key tokens (all its
    tokens without a key span), min-max normalised over the batch (of every rank) into [eps_min, eps_max]."""
    device = entropies[0].device if entropies else device
    means = [
        masked_mean(entropy, tensors["key"], tensors["segments"], rollout.group_size)
        for entropy, tensors in ((h, _group_tensors(rollout, p, device)) for p, h in enumerate(entropies))
    ]
    h = torch.cat(means) if means else torch.zeros(0, device=device)
    if world_size() == 1:
        return clip_high_from_entropy(h, config.eps_min, config.eps_max)
    inf = torch.tensor([float("inf")], device=device)
    negated_low, high = all_reduce(torch.stack([-torch.cat([h, inf]).min(), torch.cat([h, -inf]).max()]), "max")  # one collective
    return clip_high_from_entropy(h, config.eps_min, config.eps_max, (-negated_low, high))


def optimise(
    model,
    optimizer,
    rollout: Rollout,
    config: UpdateConfig,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    loss_fn: Callable = policy_loss,
) -> dict[str, float]:
    """Update ``model`` on ``rollout``: ``ppo_epochs`` optimiser steps. Returns the statistics of the
    update: loss, clip_low, clip_high, ratio, kl (means over the passes), entropy and key_entropy (of the
    first pass), eps_high (mean ε), grad_norm (of the last step)."""
    device = _device(model)
    group, n_prompts = rollout.group_size, len(rollout.prompt_ids)
    distributed = world_size() > 1
    total_tokens = float(all_reduce(torch.tensor([float(rollout.n_tokens)], device=device))[0])  # of every rank
    weight = 1.0 / max(total_tokens, 1.0)  # token-mean over the rollout batch (of every rank)
    old: list[Optional[torch.Tensor]] = [None] * n_prompts
    eps_high: Optional[torch.Tensor] = None  # [B]
    if not config.adaptive_clip:
        eps_high = torch.full((n_prompts * group,), float(config.eps_high), device=device)
    elif n_prompts > 1 or distributed:  # ε(τ) normalised over the batch (every rank's) before any loss
        scored = score(model, rollout, config)
        old = [logp for logp, _ in scored]
        eps_high = clip_bounds(rollout, [h for _, h in scored], config, device)
    reference = score(model, rollout, config, reference=True) if config.kl_coef > 0 else [None] * n_prompts
    per_prompt = [_group_tensors(rollout, p, device) for p in range(n_prompts)]  # the same every pass
    model.train()
    sums: dict[str, float] = {}
    entropy_sum = key_entropy_sum = key_tokens = 0.0
    norm = torch.tensor(0.0)
    for epoch in range(config.ppo_epochs):
        for p in range(n_prompts):
            tensors = per_prompt[p]
            logits, ids = _logits(model, rollout, p)  # [N_p, V], [N_p]
            n = ids.shape[0]
            if eps_high is None:  # one prompt with ε(τ): from this forward's entropies
                with torch.no_grad():
                    _, entropy, _ = token_logp_entropy(logits.detach(), ids, config.temperature, config.backend)
                eps_high = clip_bounds(rollout, [entropy], config)
            eps_tokens = eps_high[p * group : (p + 1) * group][tensors["segments"]]  # [N_p]
            ref_logp = reference[p][0] if reference[p] is not None else None
            weights = torch.full((n,), weight, device=device)
            loss, logp, entropy, stats = loss_fn(
                logits, ids, old[p], tensors["advantages"], weights, eps_tokens, ref_logp,
                config.eps_low, config.kl_coef, config.temperature, config.backend,
            )  # fmt: skip
            backward(loss)
            if old[p] is None:
                old[p] = logp
            if epoch == 0:
                entropy_sum += float(entropy.sum())
                key_entropy_sum += float((entropy * tensors["key"]).sum())
                key_tokens += float(tensors["key"].sum())
            for name, value in {"loss": loss.detach(), **stats}.items():
                share = 1.0 if name == "loss" else n * weight  # stats are means over this prompt's tokens
                sums[name] = sums.get(name, 0.0) + float(value) * share / config.ppo_epochs
        if distributed:  # each rank's loss is its share of the global token mean: the sum is the whole gradient
            sum_gradients([q for g in optimizer.param_groups for q in g["params"] if q.requires_grad])
        params = [q for g in optimizer.param_groups for q in g["params"] if q.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    names = ("loss", "clip_low", "clip_high", "ratio", "kl")
    totals = all_reduce(torch.tensor(
        [sums.get(name, 0.0) for name in names] + [entropy_sum, key_entropy_sum, key_tokens, float(eps_high.sum()), float(eps_high.numel())],
        dtype=torch.float64, device=device,
    )).tolist()  # fmt: skip
    out = dict(zip(names, totals))
    entropy_total, key_entropy_total, key_total, eps_total, trajectories = totals[len(names):]
    out.update(
        entropy=entropy_total / max(total_tokens, 1.0),
        key_entropy=key_entropy_total / key_total if key_total else float("nan"),
        eps_high=eps_total / trajectories if trajectories else float("nan"),
        grad_norm=float(norm),
    )
    return out
