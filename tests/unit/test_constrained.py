"""Constrained decoding of stage 1 (eagrl.llm.constrained): ``<Important Features>`` are only lists of the dataset's
names and ``<Final Answer>`` only a probability; the model's own distribution still chooses, and switching a
constraint off gives free text again."""

from __future__ import annotations

import pytest
import torch

from eagrl.llm.constrained import COMPLETE_PROBABILITIES, PROBABILITY_PREFIXES, NameListConstraint, ProbabilityConstraint, probability_tokens
from eagrl.llm.generation import Engine, PromptCache, SamplingOptions, generate, generate_continuations
from eagrl.llm.parsing import FeatureMatcher, parse_probability, section
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


def test_a_name_is_written_at_most_once(tokenizer):
    constraint = NameListConstraint(tokenizer, NAMES, max_names=5)
    lactate = _ids(tokenizer, " Lactate")
    after = lactate + [constraint.comma]
    assert lactate[0] not in constraint.allowed(after)  # Lactate is used up
    assert _ids(tokenizer, " Age")[0] in constraint.allowed(after)
    albumin = _ids(tokenizer, " Albumin")
    again = albumin + [constraint.comma] + albumin
    allowed = set(constraint.allowed(again))
    assert allowed and not allowed & {constraint.comma, constraint.eos}  # "Albumin" again only as the longer name
    assert constraint.allowed(albumin)  # before it was written, it may end there
    assert {constraint.comma, constraint.eos} <= set(constraint.allowed(albumin))
    # every name once, then only the end: a list of all six names is the longest one with max_names=6
    every = NameListConstraint(tokenizer, NAMES, max_names=10)
    assert every.max_names == len(NAMES)
    written: list[int] = []
    for name in NAMES[:-1]:
        written += _ids(tokenizer, " " + name) + [every.comma]
    last = _ids(tokenizer, " " + NAMES[-1])
    assert set(every.allowed(written)) == {last[0]}
    assert every.allowed(written + last) == [every.eos]


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
        assert len(set(written)) == len(written), out.text  # no name twice
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


def test_the_allowed_tokens_follow_a_probability(tokenizer):
    constraint = ProbabilityConstraint(tokenizer)
    text = lambda tokens: "".join(constraint.tokens[t] for t in tokens)  # noqa: E731
    starts = {text([t]) for t in constraint.allowed([])}
    assert {"0", "1", " "} <= starts and constraint.eos not in constraint.allowed([])  # something must be written
    assert starts <= PROBABILITY_PREFIXES
    zero_point = _ids(tokenizer, "0.")
    assert {text([t]) for t in constraint.allowed(zero_point)} <= set("0123456789")  # a digit, never the end yet
    after_one = set(constraint.allowed(_ids(tokenizer, "0.7")))
    assert constraint.eos in after_one and len(after_one) > 1  # complete: end, or one more digit
    assert constraint.allowed(_ids(tokenizer, "0.75")) == [constraint.eos]  # two decimals: only the end
    assert constraint.allowed(_ids(tokenizer, "1.0")) == [constraint.eos]
    assert {text([t]) for t in constraint.allowed(_ids(tokenizer, "1."))} == {"0"}
    assert constraint.allowed(_ids(tokenizer, "0.5") + [constraint.eos]) is None  # ended: the row is left alone
    assert "1.5" not in COMPLETE_PROBABILITIES and "0.123" not in COMPLETE_PROBABILITIES


def test_a_tokenizer_that_cannot_write_a_probability_fails_at_once(tokenizer):
    with pytest.raises(ValueError, match="no token that starts a probability"):
        ProbabilityConstraint(tokenizer, {7: "x"})


def test_constrained_answers_are_probabilities_the_strict_reward_reads(tokenizer, tiny):
    prompts = [build_prompt(tokenizer, f"The patient is aged {a} years.", "tjh", "mortality", "decomposition") for a in (30, 55, 81)]
    tails = ["<Final Answer>"] * 3
    options = SamplingOptions(max_new_tokens=12, do_sample=True, temperature=1.0)
    cache = PromptCache(tiny, tokenizer, prompts, Engine())
    table = probability_tokens(tokenizer)
    torch.manual_seed(0)
    constrained = generate_continuations(tiny, tokenizer, cache, prompts * 4, tails * 4, options, 6, None, lambda: ProbabilityConstraint(tokenizer, table))
    for out in constrained:
        assert out.text in COMPLETE_PROBABILITIES and out.finished, out.text
        assert parse_probability("<Final Answer>" + out.text, strict=True) == float(out.text)
    assert len({out.text for out in constrained}) > 1  # sampled from the model, not a fixed value
    torch.manual_seed(0)
    free = generate_continuations(tiny, tokenizer, cache, prompts * 4, tails * 4, options, 6)
    assert all(parse_probability("<Final Answer>" + out.text, strict=True) is None for out in free)  # a random model writes none


def test_the_answer_flag_changes_what_the_search_writes(tokenizer, tiny):
    prompts = [build_prompt(tokenizer, "The patient is aged 70 years.", "tjh", "mortality", "decomposition")]
    prefixes = [[Step("<Subquestion> Is the lactate high?\n<Answer> Yes.")]]
    sampling = PolicySampling(final=SamplingOptions(max_new_tokens=16, do_sample=True, temperature=1.0))
    answers = {}
    for constrained in (False, True):
        policy = LLMPolicy(tiny, tokenizer, sampling, batch_size=4, constrain_answer=constrained)
        policy.begin(prompts)
        torch.manual_seed(1)
        (steps,) = policy.propose_finals(prompts, prefixes, n=4)
        policy.end()
        answers[constrained] = [parse_probability(step.text, strict=True) for step in steps]
        assert all(section(step.text, "Important Features") is not None for step in steps)  # the scaffold is unchanged
    assert all(value is not None for value in answers[True])
    assert all(value is None for value in answers[False])
