"""The search on a scripted policy (selection order, backed-up values, chosen trajectory), selection,
and the crash-safe trajectory store."""

from __future__ import annotations

import json
import math

import pytest

from eagrl.data.balance import balance_patients
from eagrl.llm.parsing import FeatureMatcher
from eagrl.mcts.search import Patient, SearchConfig, Step, Trajectory, search
from eagrl.mcts.selection import SelectionConfig, select_trajectories
from eagrl.mcts.store import TrajectoryStore
from eagrl.rl.rewards import RewardConfig


class ScriptedPolicy:
    """Steps named by their path ("s0", "s0.1", ...); finals answer from a table keyed by the prefix."""

    def __init__(self, finals: dict[str, list[tuple[float, str]]]):
        self.finals, self.calls = finals, []

    @staticmethod
    def key(prefix: list[Step]) -> str:
        return "/".join(step.text.split()[1] for step in prefix)

    def propose_steps(self, prompts, prefixes, n):
        self.calls.append(("steps", [self.key(p) for p in prefixes]))
        out = []
        for prefix in prefixes:
            base = self.key(prefix)
            out.append([Step(f"<Subquestion> {base + '.' if base else 's'}{k}\n<Answer> a", tokens=3) for k in range(n)])
        return out

    def propose_finals(self, prompts, prefixes, n):
        self.calls.append(("finals", [self.key(p) for p in prefixes]))
        out = []
        for prefix in prefixes:
            table = self.finals[self.key(prefix)]
            out.append(
                [Step(f"<Final subquestion> q\n<Important Features> {f}\n<Final Answer> {p}", final=True, tokens=5) for p, f in table[:n]]
            )
        return out


def r(p: float, label: int, named: set, expert: set, lam: float = 0.6, beta: float = 0.5) -> float:
    """The combined reward written out by hand."""
    log_score = math.log(p if label == 1 else 1 - p)
    bonus = beta * (p - 0.5) if label == 1 and p > 0.5 else (beta * (0.5 - p) if label == 0 and p < 0.5 else 0.0)
    jaccard = len(named & expert) / len(named | expert) if named and expert else 0.0
    return lam * (log_score + bonus) + (1 - lam) * jaccard


def test_search_selects_expands_and_backs_up_exactly():
    finals = {
        "s0": [(0.9, "a, b"), (0.8, "a"), (0.6, "a, b, c")],  # the simulation uses the first entry
        "s1": [(0.6, "a, b"), (0.7, "b"), (0.3, "a")],
    }
    policy = ScriptedPolicy(finals)
    patient = Patient("p", "PROMPT", 1, ["a", "b"])
    config = SearchConfig(rollouts=3, n_children=2, max_depth=2, c=1.0)
    (result,) = search([patient], policy, FeatureMatcher(["a", "b", "c"]), config, RewardConfig())

    e = {"a", "b"}
    r_a, r_b = r(0.9, 1, {"a", "b"}, e), r(0.6, 1, {"a", "b"}, e)  # rollout 1: expand the root, simulate both
    assert r_a + math.sqrt(math.log(2)) > r_b + math.sqrt(math.log(2))  # rollout 2 goes down A
    r_a0, r_a1 = r(0.9, 1, {"a", "b"}, e), r(0.8, 1, {"a"}, e)  # rollout 2: A wins UCT, its 2 forced finals
    uct_a = (r_a + r_a0 + r_a1) / 3 + math.sqrt(math.log(4) / 3)
    uct_b = r_b + math.sqrt(math.log(4) / 1)
    assert uct_b > uct_a  # rollout 3 explores B
    r_b0, r_b1 = r(0.6, 1, {"a", "b"}, e), r(0.7, 1, {"b"}, e)

    assert policy.calls == [("steps", [""]), ("finals", ["s0", "s1"]), ("finals", ["s0"]), ("finals", ["s1"])]
    root = result.root
    a, b = root.children
    assert (root.visits, a.visits, b.visits) == (6, 3, 3)
    assert a.value == pytest.approx(r_a + r_a0 + r_a1) and b.value == pytest.approx(r_b + r_b0 + r_b1)
    assert root.value == pytest.approx(r_a + r_b + r_a0 + r_a1 + r_b0 + r_b1)
    assert [t.reward for t in result.trajectories] == pytest.approx([r_a, r_b, r_a0, r_a1, r_b0, r_b1])
    assert result.nodes_expanded == 3 and result.tokens_generated == 2 * 3 + 2 * 5 + 2 * 5 + 2 * 5

    best = select_trajectories(result.trajectories, 1, SelectionConfig(top_k=1))
    assert best[0].text == "<Subquestion> s0\n<Answer> a\n<Final subquestion> q\n<Important Features> a, b\n<Final Answer> 0.9"
    assert best[0].features == ["a", "b"] and best[0].y_hat == 0.9 and best[0].r_att == 1.0


def test_patients_of_a_batch_are_expanded_in_one_call():
    finals = {"": [(0.4, "a"), (0.6, "b")]}
    policy = ScriptedPolicy(finals)
    patients = [Patient(str(i), "P", i % 2, ["a"]) for i in range(4)]
    results = search(patients, policy, FeatureMatcher(["a", "b"]), SearchConfig(rollouts=2, n_children=2, max_depth=1))
    assert policy.calls[0] == ("finals", ["", "", "", ""])  # depth 1: the root's children are final steps
    assert all(len(res.trajectories) == 2 for res in results)
    assert all(res.root.children[0].terminal for res in results)


def test_search_settings_are_checked():
    for bad in ({"rollouts": 0}, {"max_depth": 0}, {"n_children": 0}, {"c": -1.0}):
        with pytest.raises(ValueError, match="search"):
            SearchConfig(**bad)


def _t(reward: float, y_hat, r_att: float = 0.5, text: str | None = None) -> Trajectory:
    return Trajectory([Step(text or f"t{reward}{y_hat}", final=True)], y_hat, [], 0.0, r_att, reward, 1)


def test_selection_filters_and_ranks():
    found = [_t(0.1, 0.8), _t(0.9, 0.3), _t(0.5, 0.7, r_att=0.1), _t(0.7, 0.9), _t(0.7, 0.9, text="t0.70.9"), _t(1.0, None)]
    kept = select_trajectories(found, 1, SelectionConfig(top_k=2, drop_wrong=True, min_alignment=0.2))
    assert [t.reward for t in kept] == [0.7, 0.1]  # 0.9 is wrong, 0.5 unaligned, duplicate text once, None dropped
    assert [t.reward for t in select_trajectories(found, 1, SelectionConfig(top_k=3, drop_wrong=False))] == [0.9, 0.7, 0.5]


def test_balance_keeps_as_many_positive_as_negative_patients():
    records = [{"id": str(i), "label": int(i < 3)} for i in range(10)] + [{"id": "0", "label": 1}]
    kept = balance_patients(records, seed=0)
    ids = {r["id"] for r in kept}
    assert len([i for i in ids if int(i) < 3]) == 3 and len(ids) == 6
    assert sum(r["id"] == "0" for r in kept) == 2  # every line of a kept patient
    assert balance_patients(records, seed=0) == kept


def test_store_recovers_from_a_kill_between_patients_and_mid_write(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    store = TrajectoryStore(path)
    store.recover()
    store.append("a", [{"id": "a", "rank": 0}, {"id": "a", "rank": 1}])
    store.append("b", [])  # a patient with nothing kept is still done
    # killed while writing patient c: one whole line and a torn one, and no done mark
    with open(path, "a") as handle:
        handle.write(json.dumps({"id": "c", "rank": 0}) + "\n" + '{"id": "c", "ra')
    with open(store.done_path, "a") as handle:
        handle.write("c")  # a torn done mark does not count either
    resumed = TrajectoryStore(path)
    assert resumed.recover() == {"a", "b"}
    assert path.read_text() == '{"id": "a", "rank": 0}\n{"id": "a", "rank": 1}\n'
    resumed.append("c", [{"id": "c", "rank": 0}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["id"], x["rank"]) for x in lines] == [("a", 0), ("a", 1), ("c", 0)]
    assert TrajectoryStore(path).recover() == {"a", "b", "c"}
