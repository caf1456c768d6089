"""Constrained ``<Important Features>`` (eagrl.llm.constrained): the model writes only lists of the dataset's names,
its own distribution still chooses among them, and switching the constraint off gives free text again."""

from __future__ import annotations

import pytest
import torch

from eagrl.llm.constrained import NameListConstraint
from eagrl.llm.generation import Engine, PromptCache, SamplingOptions, generate, generate_continuations
from eagrl.llm.parsing import FeatureMatcher, section
from eagrl.llm.prompts import build_prompt
from eagrl.mcts.policy import LLMPolicy, PolicySampling
from eagrl.mcts.search import Step

NAMES = ["Lactate", "Creatinine", "Albumin", "Age", "Albumin/globulin ratio", "Heart rate"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_allowed_tokens_follow_a_list_of_names(tokenizer):
    constraint = NameListConstraint(tokenizer, NAMES, max_names=2)
    firsts = {_ids(tokenizer, " " + name)[0] for name in NAMES}
    assert set(constraint.allowed([])) == firsts  # a name must start; no end, no comma
    lactate = _ids(tokenizer, " Lactate")
    assert set(constraint.allowed(lactate)) == {constraint.comma, constraint.eos}  # complete: go on or end
    albumin = _ids(tokenizer, " Albumin")
    after_albumin = set(constraint.allowed(albumin))
    assert {constraint.comma, constraint.eos} < after_albumin  # complete, and also the start of a longer name
    second = lactate + [constraint.comma] + _ids(tokenizer, " Age")
    assert constraint.allowed(second) == [constraint.eos]  # max_names reached: only the end
    assert constraint.allowed(second + [constraint.eos]) is None  # ended: the row is left alone


def test_bad_settings_fail_at_once(tokenizer):
    with pytest.raises(ValueError, match="no names"):
        NameListConstraint(tokenizer, [], 3)
    with pytest.raises(ValueError, match="max_names"):
        NameListConstraint(tokenizer, NAMES, 0)


def test_constrained_sampling_writes_only_names_and_unconstrained_does_not(tokenizer, tiny):
    prompts = [build_prompt(tokenizer, f"The patient is aged {a} years.", "tjh", "mortality", "decomposition") for a in (30, 55, 81)]
    tails = ["<Important Features>"] * 3
    options = SamplingOptions(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.9, min_new_tokens=3)
    cache = PromptCache(tiny, tokenizer, prompts, Engine())
    matcher = FeatureMatcher(NAMES)
    torch.manual_seed(0)
    factory = lambda: NameListConstraint(tokenizer, NAMES, max_names=3)  # noqa: E731
    constrained = generate_continuations(tiny, tokenizer, cache, prompts * 4, tails * 4, options, 6, None, factory)
    constrained += generate(tiny, tokenizer, [p + t for p, t in zip(prompts, tails)], options, 3, constraint=factory)
    for out in constrained:
        written = [part.strip() for part in out.text.split(",")]
        assert 1 <= len(written) <= 3 and all(name in NAMES for name in written), out.text
        assert out.finished  # ended by itself, before max_new_tokens
    assert len({out.text for out in constrained}) > 1  # sampled, not a fixed list
    torch.manual_seed(0)
    free = generate_continuations(tiny, tokenizer, cache, prompts * 4, tails * 4, options, 6)
    assert all(matcher.parse("<Important Features>" + out.text)[0] == [] for out in free)  # a random model names nothing


def test_the_policy_flag_changes_what_the_search_writes(tokenizer, tiny):
    prompts = [build_prompt(tokenizer, "The patient is aged 70 years.", "tjh", "mortality", "decomposition")]
    prefixes = [[Step("<Subquestion> Is the lactate high?\n<Answer> Yes.")]]
    sampling = PolicySampling(final=SamplingOptions(max_new_tokens=16, do_sample=True, temperature=1.0))
    matcher = FeatureMatcher(NAMES)
    outputs = {}
    for constrained in (False, True):
        policy = LLMPolicy(tiny, tokenizer, sampling, batch_size=4, feature_names=NAMES if constrained else None, max_features=2)
        policy.begin(prompts)
        torch.manual_seed(1)
        (steps,) = policy.propose_finals(prompts, prefixes, n=4)
        policy.end()
        outputs[constrained] = [matcher.parse(step.text) for step in steps]
        assert all(section(step.text, "Final Answer") is not None for step in steps)  # the scaffold is unchanged
    assert all(1 <= len(found) <= 2 and unknown == 0 for found, unknown in outputs[True])
    assert all(found == [] for found, _ in outputs[False])
