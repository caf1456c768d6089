"""Which searched trajectories become SFT data (METHOD.md §3), per patient (balancing across patients: ``eagrl.data.balance``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from eagrl.errors import EAGRLInputError
from eagrl.mcts.search import Trajectory


@dataclass
class SelectionConfig:
    """Per-patient selection of the searched trajectories.

    Args:
        top_k: trajectories kept per patient, by reward R (METHOD.md: the best 1-2).
        drop_wrong: drop trajectories whose prediction is on the wrong side of 0.5 (or unparseable).
        min_alignment: drop trajectories whose R_att is below this.
        require_answer: drop trajectories without a parseable final answer (off only for smoke runs
            with random models).
    """

    top_k: int = 2
    drop_wrong: bool = True
    min_alignment: float = 0.0
    require_answer: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise EAGRLInputError(f"model.init_args.selection.top_k must be >= 1, got {self.top_k}")


def select_trajectories(trajectories: Sequence[Trajectory], label: int, config: SelectionConfig = SelectionConfig()) -> list[Trajectory]:
    """The best ``top_k`` distinct trajectories by R that pass the filters (ties: the earlier found)."""
    kept, seen = [], set()
    for trajectory in sorted(trajectories, key=lambda t: -t.reward):  # sorted() is stable
        if trajectory.y_hat is None and (config.require_answer or config.drop_wrong):
            continue
        if config.drop_wrong and (trajectory.y_hat >= 0.5) != (label == 1):
            continue
        if trajectory.r_att < config.min_alignment or trajectory.text in seen:
            continue
        seen.add(trajectory.text)
        kept.append(trajectory)
        if len(kept) == config.top_k:
            break
    return kept
