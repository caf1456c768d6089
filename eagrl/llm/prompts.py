"""Prompts of the three prompting baselines (METHOD.md §6), applied through the tokenizer's chat template.

- ``vanilla``: the probability directly, after ``<Final Answer>``.
- ``think`` (Think-then-Answer): free reasoning after ``<Think>``, then ``<Important Features>`` and
  ``<Final Answer>``.
- ``decomposition`` (Question Decomposition): ``<Subquestion>``/``<Answer>`` pairs, then
  ``<Final subquestion>``, ``<Important Features>`` and ``<Final Answer>``: the format stages 1 and 2 use.

The system message is the dataset persona and the task question (``eagrl.data.text.system_prompt``); the
user message is the patient text (``EHRDataset.text``) followed by the style's instructions.
``PromptFitter`` builds a patient's prompt within a model's context (dropping the oldest visits).
"""

from __future__ import annotations

from typing import Literal, Optional

from eagrl.data.text import TASK_QUESTIONS, system_prompt
from eagrl.errors import EAGRLInputError

Style = Literal["vanilla", "think", "decomposition"]
STYLES = ("vanilla", "think", "decomposition")

INSTRUCTIONS = {
    "vanilla": (
        "Give only the probability, a number between 0 and 1, in exactly this format:\n"
        "<Final Answer> probability"
    ),
    "think": (
        "First think step by step about the patient's condition and its course. Then name the features that "
        "matter most for your judgement, using the feature names exactly as written above, and give the "
        "probability, a number between 0 and 1. Use exactly this format:\n"
        "<Think> your reasoning\n"
        "<Important Features> feature name, feature name, ...\n"
        "<Final Answer> probability"
    ),
    "decomposition": (
        "Break the question into simpler sub-questions and answer them one at a time (at most {max_steps}), then "
        "answer a final sub-question, name the features that matter most (feature names exactly as written "
        "above) and give the probability, a number between 0 and 1. Use exactly this format:\n"
        "<Subquestion> a sub-question\n"
        "<Answer> its answer\n"
        "... (more sub-question and answer pairs)\n"
        "<Final subquestion> the last sub-question\n"
        "<Important Features> feature name, feature name, ...\n"
        "<Final Answer> probability"
    ),
}


def user_message(patient_text: str, task: str, style: str, max_steps: int = 4) -> str:
    if style not in INSTRUCTIONS:
        raise EAGRLInputError(f"prompt style {style!r} is unknown: expected one of {list(STYLES)}")
    return f"{patient_text}\n\n{TASK_QUESTIONS[task]}\n{INSTRUCTIONS[style].format(max_steps=max_steps)}"


def messages(patient_text: str, dataset: str, task: str, style: str, max_steps: int = 4) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt(dataset, task)},
        {"role": "user", "content": user_message(patient_text, task, style, max_steps)},
    ]


def render(tokenizer, chat: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The prompt text through the chat template (system merged into the user turn where there is no
    system role; plain ``role: text`` lines without a template), then ``assistant_prefix``."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - some templates reject a system turn
            merged = [{"role": "user", "content": chat[0]["content"] + "\n\n" + chat[1]["content"]}, *chat[2:]]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant: "
    return text + assistant_prefix


def build_prompt(tokenizer, patient_text: str, dataset: str, task: str, style: str, max_steps: int = 4) -> str:
    return render(tokenizer, messages(patient_text, dataset, task, style, max_steps))


class PromptFitter:
    """Builds a patient's prompt within the model's context: with ``truncate_visits`` the oldest visits
    are dropped until prompt + completion fit; otherwise (or when one visit is still too long) one clear
    error. The question and instructions are never cut."""

    def __init__(self, tokenizer, limit: int, dataset: str, task: str, style: str, max_subquestions: int, truncate_visits: bool):
        self.tokenizer, self.limit, self.truncate_visits = tokenizer, limit, truncate_visits
        self.dataset, self.task, self.style, self.max_subquestions = dataset, task, style, max_subquestions

    def _build(self, data, i: int, visits: Optional[int]) -> tuple[str, int]:
        text = data.text(i) if visits is None else data.text(i, max_visits=visits)
        prompt = build_prompt(self.tokenizer, text, self.dataset, self.task, self.style, self.max_subquestions)
        return prompt, len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def __call__(self, data, i: int) -> tuple[str, int, int]:
        """``(prompt, its length in tokens, visits shown)`` for sample ``i`` of ``data`` (an EHRDataset)."""
        total = data.visits(i)
        shown = min(total, data.text_options.get("max_visits") or total)
        prompt, length = self._build(data, i, None)
        if length <= self.limit:
            return prompt, length, shown
        if not self.truncate_visits:
            raise EAGRLInputError(
                f"the prompt of sample {i} of the {data.split} split is {length} tokens, over the {self.limit} left for "
                "the prompt in the model's context: set model.init_args.truncate_visits true (drops the oldest "
                "visits), or data.init_args.max_visits, or a shorter max_new_tokens"
            )
        low, high, best = 1, shown - 1, None  # the most visits that fit (binary search)
        while low <= high:
            middle = (low + high) // 2
            candidate = self._build(data, i, middle)
            if candidate[1] <= self.limit:
                best, low = (*candidate, middle), middle + 1
            else:
                high = middle - 1
        if best is None:
            raise EAGRLInputError(
                f"even the last visit of sample {i} of the {data.split} split does not fit in {self.limit} prompt tokens: "
                "use a model with a longer context or a shorter max_new_tokens"
            )
        return best
