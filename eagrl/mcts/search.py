"""Stage 1's expert-guided Monte Carlo Tree Search over decomposition trajectories (METHOD.md §3).

A node is a partial trajectory: the (sub-question, answer) pairs from the root to it. One rollout, for
every patient of a batch in lock-step:

1. **selection**: from the root, follow the child with the highest UCT score
   ``Q + c * sqrt(ln N_parent / N_child)`` (``Q`` = mean backed-up reward; an unvisited child first) until
   a node that is not yet expanded, or a terminal one;
2. **expansion**: the policy proposes ``n_children`` next steps for that node in one batched call over all
   patients' leaves: a (sub-question, answer) pair, or, at depth ``max_depth - 1``, the forced final step
   (``<Final subquestion>``, ``<Important Features>``, ``<Final Answer>``), which makes a terminal child;
3. **evaluation**: a terminal child is scored with R = λ R_cls + (1 − λ) R_att against the expert's top-k;
   a non-terminal child is scored by a simulation: the policy writes the final step right after it (one
   batched call), and that finished trajectory's R is the child's value;
4. **backup**: each new child's value is added to it and to every ancestor (visit counts + 1).

Every finished trajectory (terminal children and simulations) is kept with its reward; ``select`` picks
the SFT data from them. Departures: the simulation is one forced final step rather than a random walk
to ``max_depth`` (a cheaper, lower-variance rollout), and all children of a leaf are evaluated at once.
The policy is anything with ``propose_steps`` and ``propose_finals`` (``LLMPolicy`` in ``policy.py``; a
scripted fake in the tests), so the search has no model or Lightning inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from eagrl.errors import EAGRLInputError
from eagrl.llm.parsing import FeatureMatcher, parse_answer
from eagrl.rl.rewards import RewardConfig, combined_reward


@dataclass
class SearchConfig:
    """MCTS settings (METHOD.md §3 defaults).

    Args:
        rollouts: selection-expansion-evaluation-backup iterations per patient.
        n_children: candidate next steps sampled per expansion.
        max_depth: the final step is forced at depth ``max_depth`` (so at most ``max_depth - 1`` pairs precede it).
        c: UCT exploration constant.
    """

    rollouts: int = 10
    n_children: int = 3
    max_depth: int = 5
    c: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rollouts", "n_children", "max_depth"):
            if int(getattr(self, name)) < 1:
                raise EAGRLInputError(f"model.init_args.search.{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.c) or self.c < 0:
            raise EAGRLInputError(f"model.init_args.search.c must be a finite number >= 0, got {self.c}")


@dataclass
class Step:
    """One step of a trajectory: a (sub-question, answer) pair, or the final step's text."""

    text: str
    final: bool = False
    tokens: int = 0


@dataclass
class Node:
    step: Optional[Step] = None  # None at the root
    parent: Optional["Node"] = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0  # sum of backed-up rewards
    depth: int = 0

    @property
    def terminal(self) -> bool:
        return self.step is not None and self.step.final

    @property
    def expanded(self) -> bool:
        return bool(self.children)

    @property
    def q(self) -> float:
        return self.value / self.visits if self.visits else 0.0

    def path(self) -> list[Step]:
        steps, node = [], self
        while node is not None and node.step is not None:
            steps.append(node.step)
            node = node.parent
        return steps[::-1]

    def uct(self, c: float) -> float:
        if self.visits == 0:
            return math.inf
        return self.q + c * math.sqrt(math.log(max(self.parent.visits, 1)) / self.visits)


@dataclass
class Patient:
    """What the search needs of one patient."""

    id: str
    prompt: str  # the chat-templated prompt that the trajectory continues
    label: int
    expert_top_k: list[str]


@dataclass
class Trajectory:
    """A finished trajectory and how it scored."""

    steps: list[Step]
    y_hat: Optional[float]
    features: list[str]
    r_cls: float
    r_att: float
    reward: float
    depth: int

    @property
    def text(self) -> str:
        return "\n".join(step.text.strip() for step in self.steps)


@dataclass
class SearchResult:
    patient: Patient
    root: Node
    trajectories: list[Trajectory]
    nodes_expanded: int = 0
    tokens_generated: int = 0


class Policy(Protocol):
    def propose_steps(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        """For each (prompt, prefix): ``n`` candidate (sub-question, answer) steps."""

    def propose_finals(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        """For each (prompt, prefix): ``n`` candidate final steps (``final=True``)."""


def select_leaf(root: Node, c: float) -> Node:
    node = root
    while node.expanded and not node.terminal:
        node = max(node.children, key=lambda child: child.uct(c))  # ties: the first child
    return node


def backup(node: Node, reward: float) -> None:
    while node is not None:
        node.visits += 1
        node.value += reward
        node = node.parent


def score(patients: Sequence[Patient], paths: Sequence[list[Step]], matcher: FeatureMatcher, reward: RewardConfig) -> list[Trajectory]:
    """Score finished trajectories (``paths[i]`` belongs to ``patients[i]``; its last step is final)."""
    parsed = [parse_answer(path[-1].text if path else "", matcher) for path in paths]
    out = combined_reward(  # the reward path reads ŷ strictly (eagrl.llm.parsing)
        [p.strict_probability for p in parsed],
        [patient.label for patient in patients],
        [p.features for p in parsed],
        [patient.expert_top_k for patient in patients],
        reward,
        [p.unknown_features for p in parsed],
    )
    return [
        Trajectory(list(path), p.strict_probability, p.features, float(out["r_cls"][i]), float(out["r_att"][i]), float(out["reward"][i]), len(path))
        for i, (path, p) in enumerate(zip(paths, parsed))
    ]


def search(
    patients: Sequence[Patient], policy: Policy, matcher: FeatureMatcher, config: SearchConfig = SearchConfig(), reward: RewardConfig = RewardConfig()
) -> list[SearchResult]:
    """Search every patient's tree, all patients' expansions batched together in each rollout."""
    results = [SearchResult(patient, Node(), []) for patient in patients]
    if hasattr(policy, "begin"):
        policy.begin([patient.prompt for patient in patients])  # e.g. prefill the prompts once
    try:
        _rollouts(results, patients, policy, matcher, config, reward)
    finally:
        if hasattr(policy, "end"):
            policy.end()
    return results


def _rollouts(results, patients, policy, matcher, config, reward) -> None:
    for _ in range(config.rollouts):
        leaves = [select_leaf(result.root, config.c) for result in results]
        # a terminal leaf (every path below the root explored to the end) is re-scored as it is: no new node
        growing = [i for i, leaf in enumerate(leaves) if not leaf.terminal]
        for i, leaf in enumerate(leaves):
            if leaf.terminal:
                backup(leaf, leaf.q)
        if not growing:
            continue
        final_now = [i for i in growing if leaves[i].depth + 1 >= config.max_depth]
        middle = [i for i in growing if leaves[i].depth + 1 < config.max_depth]
        new_children: dict[int, list[Node]] = {}
        for group, propose in ((final_now, policy.propose_finals), (middle, policy.propose_steps)):
            if not group:
                continue
            proposals = propose([patients[i].prompt for i in group], [leaves[i].path() for i in group], config.n_children)
            for i, steps in zip(group, proposals):
                leaf = leaves[i]
                leaf.children = [Node(step, leaf, depth=leaf.depth + 1) for step in steps]
                new_children[i] = leaf.children
                results[i].nodes_expanded += 1
                results[i].tokens_generated += sum(step.tokens for step in steps)
        # simulations: the final step written right after every new non-terminal child, one batched call
        open_children = [(i, child) for i in middle for child in new_children[i]]
        simulated: dict[int, Step] = {}
        if open_children:
            finals = policy.propose_finals([patients[i].prompt for i, _ in open_children], [child.path() for _, child in open_children], 1)
            for k, ((i, _), (step,)) in enumerate(zip(open_children, finals)):
                simulated[k] = step
                results[i].tokens_generated += step.tokens
        # score every finished path of this rollout together, then back the values up
        owners, paths, nodes = [], [], []
        for i in final_now:
            for child in new_children[i]:
                owners.append(i), paths.append(child.path()), nodes.append(child)
        for k, (i, child) in enumerate(open_children):
            owners.append(i), paths.append(child.path() + [simulated[k]]), nodes.append(child)
        for i, node, trajectory in zip(owners, nodes, score([patients[i] for i in owners], paths, matcher, reward)):
            results[i].trajectories.append(trajectory)
            backup(node, trajectory.reward)
