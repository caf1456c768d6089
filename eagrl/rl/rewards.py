"""The expert-guided rewards of stages 1 and 2 (METHOD.md §3): pure, batched, always finite.

- attention alignment ``R_att = |C ∩ C_exp| / (|C ∪ C_exp| + u)`` (Jaccard of the named features C and the
  expert's top-k C_exp, where the u named items that are not features of the dataset join the union, so
  naming made-up features lowers the score instead of costing nothing); 0 when either set is empty.
  Range [0, 1].
- classification ``R_cls = log(y·ŷ + (1 − y)(1 − ŷ)) + Δ`` with ŷ clipped to [0.01, 0.99] and the margin
  bonus Δ = β(ŷ − 0.5) when y = 1 and ŷ > 0.5, Δ = β(0.5 − ŷ) when y = 0 and ŷ < 0.5, else 0 (β = 0.5).
  Range [log 0.01, log 0.99 + 0.49β] = [−4.605, 0.235] at the defaults.
- combined ``R = λ R_cls + (1 − λ) R_att`` (λ = 0.6). Range [λ log 0.01, λ max R_cls + (1 − λ)].
- DAPO's overlong shaping ``overlong_penalty`` (stage 2, on in the DAPO overlay): added to R.

An unparseable answer (ŷ = None or NaN) gets the lowest reward of each kind that depends on ŷ:
``R_cls = log(clip_low)``, and ``R = λ log(clip_low)`` whatever its features (alignment is not
rewarded without an answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from eagrl.errors import EAGRLInputError


@dataclass(frozen=True)
class RewardConfig:
    """Settings of the combined reward.

    Args:
        lam: weight λ of the classification reward (1 − λ goes to the alignment reward).
        beta: margin bonus β of the classification reward.
        clip_low: ŷ is clipped to [clip_low, 1 − clip_low] inside the log.
        use_attention: False drops R_att (the "without R_att" ablation and the GRPO baseline): R = R_cls.
    """

    lam: float = 0.6
    beta: float = 0.5
    clip_low: float = 0.01
    use_attention: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise EAGRLInputError(f"model.init_args.reward.lam must be within [0, 1], got {self.lam}")
        if not 0.0 < self.clip_low < 0.5:
            raise EAGRLInputError(f"model.init_args.reward.clip_low must be within (0, 0.5), got {self.clip_low}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise EAGRLInputError(f"model.init_args.reward.beta must be a finite number >= 0, got {self.beta}")

    @property
    def r_cls_range(self) -> tuple[float, float]:
        high = 1.0 - self.clip_low
        return math.log(self.clip_low), math.log(high) + self.beta * (high - 0.5)

    @property
    def reward_range(self) -> tuple[float, float]:
        low, high = self.r_cls_range
        if not self.use_attention:
            return low, high
        return self.lam * low, self.lam * high + (1.0 - self.lam)


def _probabilities(y_hat: Sequence[Optional[float]] | torch.Tensor) -> torch.Tensor:
    """[N] float64 with NaN where ŷ is None or not a finite number."""
    if isinstance(y_hat, torch.Tensor):
        return y_hat.detach().to(torch.float64).flatten()
    values = []
    for value in y_hat:
        try:
            number = float(value) if value is not None else math.nan
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int or Fraction beyond float's range
            number = math.nan
        values.append(number)
    return torch.tensor(values, dtype=torch.float64)


def attention_alignment(
    predicted: Iterable[Iterable[str]], expert: Iterable[Iterable[str]], unknown: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """R_att per sample: Jaccard of each predicted set and its expert set, with ``unknown[i]`` named items
    that are not features of the dataset counted in the union. [N] float64 in [0, 1]."""
    scores = []
    predicted, expert = list(predicted), list(expert)
    unknown = [0] * len(predicted) if unknown is None else list(unknown)
    for mine, theirs, extra in zip(predicted, expert, unknown, strict=True):
        mine, theirs = set(mine), set(theirs)
        union = len(mine | theirs) + max(int(extra), 0)
        scores.append(len(mine & theirs) / union if mine and theirs else 0.0)
    return torch.tensor(scores, dtype=torch.float64)


def classification_reward(
    y_hat: Sequence[Optional[float]] | torch.Tensor, labels: Sequence[int] | torch.Tensor, config: RewardConfig = RewardConfig()
) -> torch.Tensor:
    """R_cls per sample. [N] float64, finite; ŷ = None/NaN/out of [0, 1] gets log(clip_low)."""
    p = _probabilities(y_hat)  # [N]
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()  # [N]
    valid = torch.isfinite(p) & (p >= 0) & (p <= 1)
    p = torch.where(valid, p, torch.full_like(p, 0.5)).clamp(config.clip_low, 1.0 - config.clip_low)
    log_score = torch.log(y * p + (1 - y) * (1 - p))  # [N]
    bonus = torch.where((y == 1) & (p > 0.5), config.beta * (p - 0.5), torch.zeros_like(p))
    bonus = torch.where((y == 0) & (p < 0.5), config.beta * (0.5 - p), bonus)
    return torch.where(valid, log_score + bonus, torch.full_like(p, math.log(config.clip_low)))


def overlong_penalty(lengths: Sequence[int], finished: Sequence[bool], max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's overlong reward shaping, added to the reward. [N] float64 in [−1, 0].

    With L = ``max_length`` and L_c = ``buffer``: 0 when |y| ≤ L − L_c; (L − L_c − |y|) / L_c when
    L − L_c < |y| ≤ L; −1 for a completion cut at L without ending (``finished`` False).
    """
    if not 0 < buffer <= max_length:
        raise EAGRLInputError(f"the overlong buffer must be within (0, max_new_tokens = {max_length}], got {buffer}")
    y = torch.as_tensor(list(lengths), dtype=torch.float64)
    done = torch.as_tensor(list(finished), dtype=torch.bool)
    soft = max_length - buffer
    penalty = torch.where(y > soft, (soft - y) / buffer, torch.zeros_like(y)).clamp(min=-1.0)
    return torch.where(~done & (y >= max_length), torch.full_like(y, -1.0), penalty)


def combined_reward(
    y_hat: Sequence[Optional[float]] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    predicted: Iterable[Iterable[str]],
    expert: Iterable[Iterable[str]],
    config: RewardConfig = RewardConfig(),
    unknown: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """``{"reward", "r_cls", "r_att", "parsed"}``, each [N]: R = λ R_cls + (1 − λ) R_att (R_cls alone
    when ``use_attention`` is off); an unparseable ŷ gets the lowest R. ``unknown``: per sample, the named
    items that are not features of the dataset (they join R_att's union)."""
    r_cls = classification_reward(y_hat, labels, config)
    r_att = attention_alignment(predicted, expert, unknown)
    p = _probabilities(y_hat)
    parsed = torch.isfinite(p) & (p >= 0) & (p <= 1)
    reward = config.lam * r_cls + (1.0 - config.lam) * r_att if config.use_attention else r_cls.clone()
    reward = torch.where(parsed, reward, torch.full_like(reward, config.reward_range[0]))
    return {"reward": reward, "r_cls": r_cls, "r_att": r_att, "parsed": parsed}
