"""The LLM as the search policy: proposes (sub-question, answer) steps and final steps, batched.

A trajectory continues the patient's decomposition prompt (``eagrl.llm.prompts``, style ``decomposition``)
in the assistant turn. ``propose_steps`` makes two batched calls over every (prefix, candidate): the
sub-questions (after ``<Subquestion>``, stopped at the next tag), then their answers (after ``<Answer>``);
``propose_finals`` makes one (after ``<Final subquestion>``, to the end: important features and final
answer). Each call has its own sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from eagrl.llm.generation import SamplingOptions, generate
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


def render_prefix(steps: Sequence[Step]) -> str:
    return "".join(step.text.strip() + "\n" for step in steps)


class LLMPolicy:
    """Proposes steps with ``model`` (a causal LM) and ``tokenizer``; ``batch_size`` sequences per call."""

    def __init__(self, model, tokenizer, sampling: PolicySampling = PolicySampling(), batch_size: int = 16):
        self.model, self.tokenizer, self.sampling, self.batch_size = model, tokenizer, sampling, batch_size

    def _generate(self, contexts: list[str], options: SamplingOptions, stops: list[str] | None):
        return generate(self.model, self.tokenizer, contexts, options, self.batch_size, stop_strings=stops)

    def propose_steps(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        bases = [prompt + render_prefix(prefix) for prompt, prefix in zip(prompts, prefixes)]
        contexts = [base + "<Subquestion>" for base in bases for _ in range(n)]
        questions = self._generate(contexts, self.sampling.subquestion, SUBQUESTION_STOPS)
        answer_contexts = [c + q.text.rstrip() + "\n<Answer>" for c, q in zip(contexts, questions)]
        answers = self._generate(answer_contexts, self.sampling.answer, ANSWER_STOPS)
        steps = [
            Step(f"<Subquestion> {q.text.strip()}\n<Answer> {a.text.strip()}", tokens=q.new_tokens + a.new_tokens)
            for q, a in zip(questions, answers)
        ]
        return [steps[k * n : (k + 1) * n] for k in range(len(bases))]

    def propose_finals(self, prompts: Sequence[str], prefixes: Sequence[list[Step]], n: int) -> list[list[Step]]:
        bases = [prompt + render_prefix(prefix) for prompt, prefix in zip(prompts, prefixes)]
        contexts = [base + "<Final subquestion>" for base in bases for _ in range(n)]
        finals = self._generate(contexts, self.sampling.final, None)
        steps = [Step(f"<Final subquestion> {f.text.strip()}", final=True, tokens=f.new_tokens) for f in finals]
        return [steps[k * n : (k + 1) * n] for k in range(len(bases))]
