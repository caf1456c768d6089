"""Stage 2's policy-optimisation maths (METHOD.md §4): pure functions on tensors, no Lightning.

- ``group_advantages``: A = (R − mean_group) / (std_group + eps); a group whose rewards are all equal
  gets A = 0 (never NaN, never eps-sized noise blown up).
- ``keep_varied_groups``: DAPO's dynamic sampling, the groups whose rewards are not all equal.
- ``clip_high_from_entropy``: EAG-RL's entropy-aware adaptive up-clipping. The mean entropy H̄(τ) of
  each trajectory over its key clinical tokens is min-max normalised over the batch and mapped linearly
  into [ε_min, ε_max]. [ours] When every H̄ is equal (or the batch holds one trajectory) the bound is
  the midpoint (ε_min + ε_max) / 2. The input is detached: the bound carries no gradient.
- ``clipped_surrogate``: the PPO objective min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) per token, with
  r = exp(logp − logp_old), aggregated by per-token weights (token-mean: 1 / tokens in the rollout
  batch), plus an optional k3 KL estimate to the reference policy. Returns the loss and the fractions of
  tokens whose ratio is clipped low / high.
- ``aggregation_weights``: the per-token weights of the three loss aggregations (token_mean,
  seq_mean_token_mean, seq_mean_token_sum_norm).
- ``policy_loss``: the fused log-prob/entropy op over the completion logits followed by the surrogate;
  this is the function the RL module runs under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from eagrl.kernels import token_logp_entropy_on


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G], normalised within each group of G completions."""
    mean = rewards.mean(dim=-1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=-1, keepdim=True)  # [P, 1] (unbiased, as GRPO)
    varied = (rewards.amax(-1, keepdim=True) - rewards.amin(-1, keepdim=True)) > 0  # [P, 1]
    advantages = (rewards - mean) / (std + eps)
    return torch.where(varied, advantages, torch.zeros_like(advantages))


def keep_varied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: the groups (rows of rewards [P, G]) whose rewards are not all equal (DAPO dynamic sampling)."""
    return (rewards.amax(-1) - rewards.amin(-1)) > 0


def clip_high_from_entropy(
    mean_entropy: torch.Tensor, eps_min: float, eps_max: float, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """ε(τ) [B] in [eps_min, eps_max] from the trajectories' mean key-token entropies [B] (detached),
    min-max normalised over the batch, or over ``bounds`` (low, high: the whole batch of every rank)."""
    h = mean_entropy.detach().float()  # [B]
    low, high = bounds if bounds is not None else (h.min(), h.max())
    span = high - low
    scaled = torch.where(span > 0, (h - low) / span.clamp_min(torch.finfo(h.dtype).tiny), torch.full_like(h, 0.5))
    return eps_min + (eps_max - eps_min) * scaled


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_weights(lengths: torch.Tensor, mode: str, tokens: float, sequences: float, max_length: int) -> torch.Tensor:
    """Per-token weights [N] of a mini-batch's loss sum, for completions of ``lengths`` [S] (this rank's share).

    ``tokens`` / ``sequences``: the mini-batch's totals over every rank. Modes:
    - ``token_mean`` (DAPO): every token weighs 1 / tokens, so long completions count per token;
    - ``seq_mean_token_mean`` (the original GRPO): each completion's token mean, averaged over completions:
      1 / (|y| · sequences);
    - ``seq_mean_token_sum_norm`` (Dr. GRPO): each completion's token sum over a constant, the longest
      allowed completion ``max_length``, averaged over completions: 1 / (max_length · sequences).
    """
    lengths = lengths.float()
    if mode == "token_mean":
        per_sequence = torch.full_like(lengths, 1.0 / max(tokens, 1.0))
    elif mode == "seq_mean_token_mean":
        per_sequence = 1.0 / (lengths.clamp_min(1.0) * max(sequences, 1.0))
    elif mode == "seq_mean_token_sum_norm":
        per_sequence = torch.full_like(lengths, 1.0 / (max(max_length, 1) * max(sequences, 1.0)))
    else:
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
    return torch.repeat_interleave(per_sequence, lengths.long())  # [N]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of ``values`` [N] over the positions where ``mask`` [N] holds, per segment id ``segments`` [N]
    -> [n_segments]; a segment with no masked position falls back to the mean over all its positions."""
    values = values.float()
    total = torch.zeros(n_segments, device=values.device).index_add_(0, segments, values * mask)
    count = torch.zeros(n_segments, device=values.device).index_add_(0, segments, mask.float())
    all_total = torch.zeros(n_segments, device=values.device).index_add_(0, segments, values)
    all_count = torch.zeros(n_segments, device=values.device).index_add_(0, segments, torch.ones_like(values))
    return torch.where(count > 0, total / count.clamp_min(1), all_total / all_count.clamp_min(1))


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    eps_low: float,
    eps_high: torch.Tensor | float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted clipped surrogate (to minimise) over N tokens, and its statistics.

    Args (each [N] over the completion tokens of the microbatch):
        logp / old_logp: log-probs of the sampled tokens under the current / rollout policy.
        advantages: the token's trajectory advantage.
        weights: aggregation weight (token-mean: 1 / tokens in the rollout batch; 0 for padding).
        eps_low: the fixed lower clip ε_low.
        eps_high: the upper clip ε_high, a float or per token (EAG-RL's ε(τ) of the token's trajectory).
        ref_logp, kl_coef: the reference policy's log-probs and β_KL (k3 estimator).
    Returns ``(loss, stats)``; stats hold ``clip_low``/``clip_high`` (fractions of weighted tokens whose
    clip is active), ``ratio`` and ``kl`` (weighted means), all detached.
    """
    ratio = torch.exp(logp - old_logp)  # [N]
    upper = 1.0 + (eps_high if isinstance(eps_high, torch.Tensor) else torch.full_like(ratio, eps_high))  # [N]
    clipped_ratio = torch.minimum(torch.clamp(ratio, min=1.0 - eps_low), upper)  # [N]
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # [N]
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        delta = ref_logp - logp  # [N]
        kl = torch.exp(delta) - delta - 1.0  # k3, >= 0
        per_token = per_token + kl_coef * kl
    loss = (per_token * weights).sum()
    with torch.no_grad():
        counted = (weights > 0).float()  # [N]
        n = counted.sum().clamp_min(1.0)
        stats = {
            "clip_low": (((ratio < 1.0 - eps_low) & (advantages < 0)).float() * counted).sum() / n,
            "clip_high": (((ratio > upper) & (advantages > 0)).float() * counted).sum() / n,
            "ratio": (ratio * counted).sum() / n,
            "kl": (kl * counted).sum() / n,
        }
    return loss, stats


def policy_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    eps_high: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    eps_low: float,
    kl_coef: float,
    temperature: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, logp, entropy, stats)`` for completion logits [N, V] and sampled ``ids`` [N]; the other
    tensors are [N] as in ``clipped_surrogate``. ``old_logp`` None: the rollout policy is the current one,
    so its log-probs are this forward's, detached. ``ref_logp`` is used only when ``kl_coef`` > 0.
    ``backend`` is a resolved path (``triton`` or ``torch``: ``eagrl.kernels.resolve_backend``, called once
    outside this function, so a compiled region never resolves it)."""
    logp, entropy, _ = token_logp_entropy_on(backend, logits, ids, temperature)  # [N] each, fp32
    if old_logp is None:
        old_logp = logp.detach()
    loss, stats = clipped_surrogate(logp, old_logp, advantages, weights, eps_low, eps_high, ref_logp if kl_coef > 0 else None, kl_coef)
    return loss, logp.detach(), entropy.detach(), stats


@dataclass
class Rollout:
    """One rollout batch: P prompts x G completions, flattened to B = P·G trajectories and N tokens.

    Attributes:
        prompt_ids: per prompt, its token ids (P lists).
        completions: per trajectory, its sampled token ids (B lists, group-major: trajectory b belongs to prompt b // G).
        texts: per trajectory, the decoded completion (B).
        rewards / r_cls / r_att / parsed: [B] from the combined reward.
        advantages: [B] group-normalised.
        key_mask: per trajectory, a bool per token: inside the ``<Important Features>`` span (B lists).
        group_size: G.
        sampler_logp: per trajectory, the sampler's log-prob of each token (B lists; None when not kept). The
            update never uses them (its old log-probs are the training forward's); they measure how far the
            sampler's numerics (another dtype, another kernel) drift from training: ``train/logp_mismatch``.
    """

    prompt_ids: list[list[int]]
    completions: list[list[int]]
    texts: list[str]
    rewards: torch.Tensor
    r_cls: torch.Tensor
    r_att: torch.Tensor
    parsed: torch.Tensor
    advantages: torch.Tensor
    key_mask: list[list[bool]]
    group_size: int
    sampler_logp: Optional[list[list[float]]] = None

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """The groups of ``parts`` (same G) in one rollout, in order."""
        return Rollout(
            prompt_ids=[q for r in parts for q in r.prompt_ids],
            completions=[c for r in parts for c in r.completions],
            texts=[t for r in parts for t in r.texts],
            rewards=torch.cat([r.rewards for r in parts]),
            r_cls=torch.cat([r.r_cls for r in parts]),
            r_att=torch.cat([r.r_att for r in parts]),
            parsed=torch.cat([r.parsed for r in parts]),
            advantages=torch.cat([r.advantages for r in parts]),
            key_mask=[m for r in parts for m in r.key_mask],
            group_size=parts[0].group_size,
            sampler_logp=[q for r in parts for q in r.sampler_logp] if all(r.sampler_logp is not None for r in parts) else None,
        )

    def select_groups(self, keep: torch.Tensor) -> "Rollout":
        """The rollout restricted to the prompts where ``keep`` [P] holds."""
        groups = [p for p in range(len(self.prompt_ids)) if bool(keep[p])]
        rows = [p * self.group_size + g for p in groups for g in range(self.group_size)]
        index = torch.tensor(rows, dtype=torch.long)
        return Rollout(
            prompt_ids=[self.prompt_ids[p] for p in groups],
            completions=[self.completions[b] for b in rows],
            texts=[self.texts[b] for b in rows],
            rewards=self.rewards[index],
            r_cls=self.r_cls[index],
            r_att=self.r_att[index],
            parsed=self.parsed[index],
            advantages=self.advantages[index],
            key_mask=[self.key_mask[b] for b in rows],
            group_size=self.group_size,
            sampler_logp=[self.sampler_logp[b] for b in rows] if self.sampler_logp is not None else None,
        )
