"""One policy update over a rollout batch (METHOD.md §4), independent of Lightning.

``optimise`` follows the paper's framework (verl's ``ppo_mini_batch_size``):

1. a no-grad scoring pass of the rollout policy over every completion gives the old log-probs and the
   token entropies, before any update; EAG-RL's ε(τ) comes from those entropies (each trajectory's mean
   over its key tokens, min-max normalised over the batch of every rank);
2. the rollout batch (B completions, group-major) is cut into mini-batches of ``mini_batch_size``
   completions; each mini-batch is one optimiser step, for ``ppo_epochs`` passes. From the second step on
   the policy has moved, so the ratios leave 1 and the clips act;
3. per mini-batch and prompt, the logits of that prompt's completions in the mini-batch with the prompt
   computed once (``completion_logits``), the loss (``policy_loss``: fused log-prob/entropy op + clipped
   surrogate, aggregated by ``loss_agg`` over the mini-batch), the backward; then gradient clipping and the
   step.

A KL penalty adds a no-grad pass of the model with its LoRA adapter disabled. Under DDP the mini-batches
are those of the global batch (the one-process batch: ``mini_batches``); each rank computes its share of
mini-batch k, the aggregation normalisers are the whole mini-batch's, and the gradients are summed over
the ranks before each step, so N ranks take the one-process steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from eagrl.distributed import all_reduce, rank, sum_gradients, world_size
from eagrl.kernels import check_ids, token_logp_entropy_on
from eagrl.rl.grpo import Rollout, aggregation_weights, clip_high_from_entropy, masked_mean, policy_loss
from eagrl.kernels.fused_linear import fused_linear_policy_loss, output_layer
from eagrl.rl.rollout import completion_hidden, completion_logits


@dataclass(frozen=True)
class UpdateConfig:
    """Settings of a policy update (the RL module's arguments of the same names)."""

    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # completions per optimiser step; None: the whole rollout batch
    loss_agg: str = "token_mean"
    max_length: int = 256  # the longest completion (rollout max_new_tokens): seq_mean_token_sum_norm's constant
    eps_low: float = 0.2
    eps_high: float = 0.2
    adaptive_clip: bool = True
    eps_min: float = 0.2
    eps_max: float = 0.4
    kl_coef: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    backend: str = "torch"  # a resolved path: triton or torch (eagrl.kernels.resolve_backend)
    fused_linear: bool = False  # the loss from the hidden states, never holding the logits (eagrl.kernels.fused_linear)
    chunk_size: int | None = None  # fused_linear: rows per chunk (None: default_chunk of the vocabulary)

    def __post_init__(self) -> None:
        if self.backend not in ("triton", "torch"):
            raise ValueError(f"UpdateConfig.backend must be a resolved path, 'triton' or 'torch' (resolve_backend), got {self.backend!r}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"UpdateConfig.mini_batch_size must be >= 1 completion, got {self.mini_batch_size}")


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


def _logits(model, rollout: Rollout, p: int, members: list[int] | None = None, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] (``hidden``: the final hidden states [N, D]) and ids [N] of prompt p's completions
    (``members``: their indices in the group; None: all)."""
    group = rollout.group_size
    members = list(range(group)) if members is None else members
    project = completion_hidden if hidden else completion_logits
    return project(model, rollout.prompt_ids[p], [rollout.completions[p * group + g] for g in members])


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
        logp, entropy, _ = token_logp_entropy_on(config.backend, logits, ids, config.temperature)
        out.append((logp, entropy))
    return out


def _per_trajectory(rollout: Rollout, per_prompt: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split per-prompt token tensors [N_p] into per-trajectory ones [|y_b|] (B, group-major)."""
    out = []
    for p, values in enumerate(per_prompt):
        lengths = [len(rollout.completions[p * rollout.group_size + g]) for g in range(rollout.group_size)]
        out.extend(torch.split(values, lengths))
    return out


def mini_batches(n_trajectories: int, size: int | None, group: int = 1, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's trajectories 0..B-1 in the mini-batches of ``size`` completions of the global batch (None:
    one mini-batch), as lists of local indices, one per mini-batch up to this rank's last (some may be empty).

    The global batch is the one-process batch: under N ranks, rank r's prompt j is the global prompt
    j·N + r (``EpochShuffle`` deals prompts round-robin), so N ranks step through the mini-batches of one
    process with N times their batch."""
    if n_trajectories == 0:
        return []
    position = [((b // group) * world + rank) * group + b % group for b in range(n_trajectories)]  # global completion index
    if not size:
        return [list(range(n_trajectories))]
    batches: list[list[int]] = [[] for _ in range(max(position) // size + 1)]
    for b, k in enumerate(position):
        batches[k // size].append(b)
    return batches


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
    linear_loss_fn: Callable = fused_linear_policy_loss,
) -> dict[str, float]:
    """Update ``model`` on ``rollout``: ``ppo_epochs`` passes over its mini-batches, one optimiser step each
    (see the module docstring); ``loss_fn`` (logits) or, with ``config.fused_linear``, ``linear_loss_fn`` (hidden
    states and the output layer) gives each prompt's loss. Returns the statistics of the update: loss (mean over the steps),
    clip_low, clip_high, ratio, kl (token means over every step), entropy and key_entropy (of the rollout
    policy), eps_high with eps_high_min / eps_high_max (ε of the trajectories), steps, grad_norm (last step),
    logp_mismatch (mean |logp_sampler - logp_train| over the sampled tokens; NaN without ``sampler_logp``)."""
    device = _device(model)
    group, n_prompts, n_traj = rollout.group_size, len(rollout.prompt_ids), len(rollout.completions)
    distributed = world_size() > 1
    lengths = torch.tensor([len(c) for c in rollout.completions], dtype=torch.float64)  # [B]
    vocab = model.get_output_embeddings().weight.shape[0]
    check_ids(torch.tensor([t for c in rollout.completions for t in c], dtype=torch.long), vocab)  # once, before any kernel reads them

    # 1. the rollout policy, before any update: old log-probs, entropies, ε(τ)
    scored = score(model, rollout, config)
    old = _per_trajectory(rollout, [logp for logp, _ in scored])  # B x [|y_b|]
    entropies = [h for _, h in scored]
    mismatch_sum, mismatch_tokens = 0.0, 0.0  # |logp_sampler - logp_train| over the sampled tokens
    for b, sampled in enumerate(rollout.sampler_logp or []):
        k = min(len(sampled), len(old[b]))  # an empty completion was given one end-of-text token, never sampled
        if k:
            mismatch_sum += float((torch.tensor(sampled[:k], dtype=torch.float64) - old[b][:k].double().cpu()).abs().sum())
            mismatch_tokens += k
    if config.adaptive_clip:
        eps_high = clip_bounds(rollout, entropies, config, device)  # [B]
    else:
        eps_high = torch.full((n_traj,), float(config.eps_high), device=device)
    reference = _per_trajectory(rollout, [logp for logp, _ in score(model, rollout, config, reference=True)]) if config.kl_coef > 0 else None
    key = [torch.tensor(m, dtype=torch.bool, device=device) for m in rollout.key_mask]  # B x [|y_b|]
    entropy_b = _per_trajectory(rollout, entropies)
    entropy_sum = sum(float(h.sum()) for h in entropy_b)
    key_entropy_sum = sum(float((h * k).sum()) for h, k in zip(entropy_b, key))
    key_tokens = sum(float(k.sum()) for k in key)

    # 2. the mini-batches: as many steps on every rank (a rank with fewer completions steps with zero gradient)
    batches = mini_batches(n_traj, config.mini_batch_size, group, rank(), world_size())
    n_steps = int(all_reduce(torch.tensor([float(len(batches))], device=device), "max")[0]) if distributed else len(batches)
    batches += [[] for _ in range(n_steps - len(batches))]
    model.train()
    sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio": 0.0, "kl": 0.0}
    counted_tokens = 0.0
    norm = torch.tensor(0.0)
    for _ in range(config.ppo_epochs):
        for members in batches:
            totals = torch.tensor([float(lengths[members].sum()), float(len(members))], dtype=torch.float64, device=device)
            tokens, sequences = all_reduce(totals).tolist() if distributed else totals.tolist()
            by_prompt: dict[int, list[int]] = {}
            for b in members:
                by_prompt.setdefault(b // group, []).append(b % group)
            step_loss = 0.0
            for p, in_group in by_prompt.items():
                rows = [p * group + g for g in in_group]
                logits, ids = _logits(model, rollout, p, in_group, hidden=config.fused_linear)  # [N, V] (fused_linear: [N, D]), [N]
                segment_lengths = lengths[rows]
                segments = torch.repeat_interleave(torch.arange(len(rows), device=device), segment_lengths.long().to(device))  # [N]
                weights = aggregation_weights(segment_lengths, config.loss_agg, tokens, sequences, config.max_length).to(device)
                advantages = rollout.advantages[rows].float().to(device)[segments]  # [N]
                eps_tokens = eps_high[rows][segments]  # [N]
                old_logp = torch.cat([old[b] for b in rows])
                ref_logp = torch.cat([reference[b] for b in rows]) if reference is not None else None
                if config.fused_linear:
                    weight, scale = output_layer(model)  # logits = scale · h Wᵀ: the scale folds into the temperature
                    loss, _, _, stats = linear_loss_fn(
                        logits, weight, ids, old_logp, advantages, weights, eps_tokens, ref_logp,
                        config.eps_low, config.kl_coef, config.temperature / scale, config.backend, config.chunk_size,
                    )  # fmt: skip
                else:
                    loss, _, _, stats = loss_fn(
                        logits, ids, old_logp, advantages, weights, eps_tokens, ref_logp,
                        config.eps_low, config.kl_coef, config.temperature, config.backend,
                    )  # fmt: skip
                backward(loss)
                n = float(ids.shape[0])
                step_loss += float(loss.detach())
                counted_tokens += n
                for name in ("clip_low", "clip_high", "ratio", "kl"):
                    sums[name] += float(stats[name]) * n  # stats are means over these tokens
            sums["loss"] += step_loss
            if distributed:  # each rank's loss is its share of the mini-batch's aggregate: the sum is the whole gradient
                sum_gradients([q for g in optimizer.param_groups for q in g["params"] if q.requires_grad])
            params = [q for g in optimizer.param_groups for q in g["params"] if q.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    steps = config.ppo_epochs * n_steps
    names = ("loss", "clip_low", "clip_high", "ratio", "kl")
    totals = all_reduce(torch.tensor(
        [sums[name] for name in names] + [counted_tokens, entropy_sum, key_entropy_sum, key_tokens, float(lengths.sum()),
                                          float(eps_high.sum()), float(n_traj), mismatch_sum, mismatch_tokens],
        dtype=torch.float64, device=device,
    )).tolist()  # fmt: skip
    (loss_total, clip_low, clip_high, ratio, kl, tokens_seen, entropy_total, key_entropy_total, key_total, all_tokens, eps_total,
     trajectories, mismatch_total, mismatch_count) = totals  # fmt: skip
    inf = torch.tensor([math.inf], dtype=torch.float64, device=device)
    spread = torch.stack([-torch.cat([eps_high.double(), inf]).min(), torch.cat([eps_high.double(), -inf]).max()])
    negated_min, high = all_reduce(spread, "max").tolist()  # one collective, every rank (an empty one too)
    seen = max(tokens_seen, 1.0)
    return {
        "loss": loss_total / max(steps, 1),  # the ranks' shares summed: the mini-batch loss, averaged over the steps
        "clip_low": clip_low / seen,
        "clip_high": clip_high / seen,
        "ratio": ratio / seen,
        "kl": kl / seen,
        "entropy": entropy_total / max(all_tokens, 1.0),
        "key_entropy": key_entropy_total / key_total if key_total else float("nan"),
        "eps_high": eps_total / trajectories if trajectories else float("nan"),
        "eps_high_min": -negated_min if trajectories else float("nan"),
        "eps_high_max": high if trajectories else float("nan"),
        "steps": float(steps),
        "grad_norm": float(norm),
        "logp_mismatch": mismatch_total / mismatch_count if mismatch_count else float("nan"),
    }
