"""The LLM as the search policy: proposes (sub-question, answer) steps and final steps, batched.

A trajectory continues the patient's decomposition prompt (``eagrl.llm.prompts``, style ``decomposition``)
in the assistant turn. ``propose_steps`` makes two batched calls over every (prefix, candidate): the
sub-questions (after ``<Subquestion>``, stopped at the next tag), then their answers (after ``<Answer>``);
``propose_finals`` makes three, scaffolded the same way: the final sub-question (after ``<Final subquestion>``),
the important features (after ``<Important Features>``) and the final answer (after ``<Final Answer>``, a few
tokens). The tags are written by the search, the content by the model, so every final step has the
structure the strict reward reads (``eagrl.llm.parsing``) and ŷ is still only what the model writes after
``<Final Answer>``. Each kind of call has its own sampling settings.

[ours] With ``feature_names``, the important features are sampled among those names only
(``eagrl.llm.constrained``): the model still chooses which, the expert's are never shown to it. With
``constrain_answer``, the final answer is a probability (``0.d``, ``0.dd`` or ``1.0``) whose digits the model chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from eagrl.llm.constrained import NameListConstraint, ProbabilityConstraint, probability_tokens
from eagrl.llm.generation import Engine, PromptCache, SamplingOptions, generate, generate_continuations
from eagrl.mcts.search import Step


def _sq() -> SamplingOptions:
    return SamplingOptions(max_new_tokens=64, do_sample=True, temperature=1.2, top_p=0.8)


def _answer() -> SamplingOptions:
    return SamplingOptions(max_new_tokens=128, do_sample=True, temperature=0.9, top_p=1.0)


def _final() -> SamplingOptions:
    return SamplingOptions(max_new_tokens=128, do_sample=True, temperature=0.9, top_p=1.0)


@dataclass
class PolicySampling:
    """Sampling settings of the three kinds of generation in the search (METHOD.md §3 defaults).

    Args:
        subquestion: sub-question sampling (temperature 1.2, top_p 0.8, 64 new tokens).
        answer: answer sampling (temperature 0.9, 128 new tokens).
        final: final step sampling (final sub-question, important features, final answer).
    """

    subquestion: SamplingOptions = field(default_factory=_sq)
    answer: SamplingOptions = field(default_factory=_answer)
    final: SamplingOptions = field(default_factory=_final)


SUBQUESTION_STOPS = ["<Answer>", "<Subquestion>", "<Final", "<Important"]
ANSWER_STOPS = ["<Subquestion>", "<Final", "<Important", "<Answer>"]
FINAL_QUESTION_STOPS = ["<Important", "<Final", "<Subquestion>", "<Answer>"]
FEATURE_STOPS = ["<Final", "<Subquestion>", "<Answer>", "<Important", "\n\n"]
FINAL_ANSWER_STOPS = ["\n", "<"]
FINAL_ANSWER_TOKENS = 12  # a probability or a percentage


def longest_path(tokenizer, sampling: PolicySampling, max_depth: int, feature_names: Optional[Sequence[str]] = None, max_features: int = 5) -> int:
    """The most tokens a search path can hold, tags included: ``max_depth - 1`` (sub-question, answer) pairs, then
    the final sub-question, the important features (a constrained list of ``max_features`` of ``feature_names``: its
    longest) and the final answer. An SFT target of stage 1 is one such path plus the end-of-turn token."""
    tags = "".join(f"{tag} \n" for tag in ("<Subquestion>", "<Answer>") * (max_depth - 1))
    tags += "<Final subquestion> \n<Important Features> \n<Final Answer> "
    features = sampling.final.max_new_tokens
    if feature_names is not None:
        features = max(features, NameListConstraint(tokenizer, feature_names, max_features).longest_list)
    pairs = (max_depth - 1) * (sampling.subquestion.max_new_tokens + sampling.answer.max_new_tokens)
    final = sampling.final.max_new_tokens + features + min(sampling.final.max_new_tokens, FINAL_ANSWER_TOKENS)
    return len(tokenizer(tags, add_special_tokens=False)["input_ids"]) + pairs + final


def render_prefix(steps: Sequence[Step]) -> str:
    return "".join(step.text.strip() + "\n" for step in steps)


class LLMPolicy:
    """Proposes steps with ``model`` (a causal LM) and ``tokenizer``; ``batch_size`` sequences per call.

    With ``reuse_prompt_cache`` (default), ``begin`` prefills the batch's patient prompts once and every
    call of the search continues that cache (``PromptCache``); otherwise each sequence is prefilled anew.
    ``feature_names``: sample the ``<Important Features>`` among these names only, at most ``max_features``
    (None: free text). ``constrain_answer``: the ``<Final Answer>`` is a probability (``0.d``, ``0.dd`` or ``1.0``)
    sampled from the model's own distribution over those strings (off: free text).
    """

    def __init__(
        self,
        model,
        tokenizer,
        sampling: PolicySampling = PolicySampling(),
        batch_size: int = 16,
        reuse_prompt_cache: bool = True,
        engine: Engine = Engine(),
        feature_names: Optional[Sequence[str]] = None,
        max_features: int = 5,
        constrain_answer: bool = False,
    ):
        self.model, self.tokenizer, self.sampling, self.batch_size = model, tokenizer, sampling, batch_size
        self.reuse_prompt_cache, self.engine = reuse_prompt_cache, engine
        self.feature_constraint, self.feature_tokens = None, 0
        if feature_names is not None:  # built once now: bad settings fail here, not mid-search
            self.feature_tokens = NameListConstraint(tokenizer, feature_names, max_features).longest_list
            self.feature_constraint = lambda: NameListConstraint(tokenizer, feature_names, max_features)
        self.answer_constraint = None
        if constrain_answer:
            table = probability_tokens(tokenizer)
            ProbabilityConstraint(tokenizer, table)  # fails now if the tokenizer cannot write one
            self.answer_constraint = lambda: ProbabilityConstraint(tokenizer, table)
        self.cache: PromptCache | None = None

    def begin(self, prompts: Sequence[str]) -> None:
        self.cache = PromptCache(self.model, self.tokenizer, list(prompts), self.engine) if self.reuse_prompt_cache else None

    def end(self) -> None:
        self.cache = None

    def _generate(self, prompts: list[str], tails: list[str], options: SamplingOptions, stops: list[str] | None, constraint=None):
        if self.cache is not None:
            return generate_continuations(
                self.model, self.tokenizer, self.cache, prompts, tails, options, self.batch_size, stops, constraint
            )
        contexts = [p + t for p, t in zip(prompts, tails)]
        return generate(
            self.model, self.tokenizer, contexts, options, self.batch_size, stop_strings=stops, engine=self.engine, constraint=constraint
        )

    def propose_steps(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        owners = [prompt for prompt in prompts for _ in range(n)]
        tails = [render_prefix(prefix) + "<Subquestion>" for prefix in prefixes for _ in range(n)]
        questions = self._generate(owners, tails, self.sampling.subquestion, SUBQUESTION_STOPS)
        answer_tails = [t + q.text.rstrip() + "\n<Answer>" for t, q in zip(tails, questions)]
        answers = self._generate(owners, answer_tails, self.sampling.answer, ANSWER_STOPS)
        steps = [
            Step(f"<Subquestion> {q.text.strip()}\n<Answer> {a.text.strip()}", tokens=q.new_tokens + a.new_tokens)
            for q, a in zip(questions, answers)
        ]
        return [steps[k * n : (k + 1) * n] for k in range(len(prefixes))]

    def propose_finals(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        owners = [prompt for prompt in prompts for _ in range(n)]
        tails = [render_prefix(prefix) + "<Final subquestion>" for prefix in prefixes for _ in range(n)]
        final = self.sampling.final
        questions = self._generate(owners, tails, final, FINAL_QUESTION_STOPS)
        feature_tails = [t + q.text.rstrip() + "\n<Important Features>" for t, q in zip(tails, questions)]
        # a constrained list always has room to end: never cut after a comma or inside a name
        room = replace(final, max_new_tokens=max(final.max_new_tokens, self.feature_tokens))
        features = self._generate(owners, feature_tails, room, FEATURE_STOPS, self.feature_constraint)
        answer_tails = [t + f.text.rstrip() + "\n<Final Answer>" for t, f in zip(feature_tails, features)]
        short = replace(final, max_new_tokens=min(final.max_new_tokens, FINAL_ANSWER_TOKENS), min_new_tokens=0)
        answers = self._generate(owners, answer_tails, short, FINAL_ANSWER_STOPS, self.answer_constraint)
        steps = [
            Step(
                f"<Final subquestion> {q.text.strip()}\n<Important Features> {f.text.strip()}\n<Final Answer> {a.text.strip()}",
                final=True,
                tokens=q.new_tokens + f.new_tokens + a.new_tokens,
            )
            for q, f, a in zip(questions, features, answers)
        ]
        return [steps[k * n : (k + 1) * n] for k in range(len(prefixes))]
