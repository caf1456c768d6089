"""Constrained decoding in stage 1: the ``<Important Features>`` step picks among the dataset's variable names, and
the ``<Final Answer>`` step writes a probability.

[ours] A small policy (SmolLM2-135M) writing the important features freely almost never names a variable of the
dataset (0 of 9 sampled trajectories on the synthetic cohort; no kept TJH trajectory in stage 1), so the search's
R_att is 0 on every path and stage 1 cannot select for alignment with the expert. ``NameListConstraint`` is a
transformers ``LogitsProcessor`` that masks every next token that would not continue a list of the dataset's names
written as `` name, name, name``: the model's own distribution, restricted to valid lists, still decides which
names (and how many, up to ``max_names``) it writes; the expert's features are never shown to it. The search then
rewards the paths whose names agree with the expert, as the paper's stage 1 does. Only stage 1 uses it
(``DistillModule(constrain_features=True)``); SFT, RL and evaluation read free text.

Each name is tokenised as ``" " + name`` (its canonical tokens); the allowed tokens are held in a trie. After a
complete name the model may write ``","`` (another name follows) or end the step (end-of-text); after
``max_names`` names only the end. A name is written at most once per list: the 2026-12-06 synthetic stage 1 wrote
lists such as "Respiratory rate, ..., Respiratory rate", and the SFT and RL policies trained on them looped in the
feature list at test time.

[ours] ``ProbabilityConstraint`` does the same for the ``<Final Answer>`` step: only ``0.d``, ``0.dd`` or ``1.0``
(after an optional space), the digits chosen by the model's own distribution. Free, most of SmolLM2-135M's stage-1
answers were sentences, not probabilities ("1 feature: 10.10", "Reduced by 4% because of the age of 7"), so the
search's R_cls scored whatever number a sentence happened to hold first, and SFT on those paths taught such answers
(half of the synthetic SFT model's test answers held none the strict reward reads). The answer is still the model's: which probability it writes is
what the search rewards for being on the right side of 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    number: int | None = None  # the name that ends here (None: no name does)
    names: set[int] = field(default_factory=set)  # the names that end at or below this node

    @property
    def terminal(self) -> bool:
        return self.number is not None


class _Mask:
    """A ``LogitsProcessor`` for one ``generate`` call that keeps, per row, the scores of ``allowed(written)`` only
    (its state is the prompt length seen on the first call); a row whose ``allowed`` is None is left alone."""

    start: int | None = None

    def allowed(self, new: Sequence[int]) -> list[int] | None:
        raise NotImplementedError

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, prompt + written]; scores: [B, V]
        if self.start is None:
            self.start = input_ids.shape[1]
        masked = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            allowed = self.allowed(input_ids[row, self.start :].tolist())
            if allowed is None:
                masked[row] = scores[row]
            else:
                index = torch.tensor(allowed, device=scores.device)
                masked[row, index] = scores[row, index]
        return masked


class NameListConstraint(_Mask):
    """A ``LogitsProcessor`` for one ``generate`` call (its state is the prompt length seen on the first call).

    Args:
        tokenizer: the policy's tokenizer.
        names: the allowed names (the dataset's feature names).
        max_names: the most names in the list.
    """

    def __init__(self, tokenizer, names: Sequence[str], max_names: int = 5):
        if not names:
            raise ValueError("NameListConstraint: no names to choose from")
        if max_names < 1:
            raise ValueError(f"NameListConstraint: max_names must be >= 1, got {max_names}")
        self.root = _Node()
        longest = 0
        for number, name in enumerate(dict.fromkeys(names)):
            node = self.root
            node.names.add(number)
            tokens = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
            longest = max(longest, len(tokens))
            for token in tokens:
                node = node.children.setdefault(token, _Node())
                node.names.add(number)
            node.number = number
        self.max_names = min(max_names, len(self.root.names))  # no name twice: never more than there are
        self.longest_list = self.max_names * (longest + 1)  # tokens of the longest allowed list and its end
        (self.comma,) = tokenizer(",", add_special_tokens=False)["input_ids"][:1]
        self.end = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    def allowed(self, new: Sequence[int]) -> list[int] | None:
        """The tokens allowed after ``new`` (the tokens written so far); None once the list has ended."""
        node, written = self.root, set()
        for token in new:
            if token in self.end:
                return None
            if token == self.comma and node.terminal and node is not self.root:
                written.add(node.number)
                node = self.root
                continue
            node = node.children.get(token)
            if node is None:  # cannot happen under the mask; leave such a row alone
                return None
        # no name twice: only children that lead to a name not yet written, and no end after a written one
        allowed = [token for token, child in node.children.items() if child.names - written]
        if node.terminal and node.number not in written:
            allowed.append(self.eos)
            if len(written) + 1 < self.max_names:
                allowed.append(self.comma)
        return allowed


def _probability_strings() -> tuple[frozenset[str], frozenset[str]]:
    """(every complete answer, every prefix of one): ``0.d``, ``0.dd``, ``1.0``, each also after one space."""
    complete = {"1.0"} | {f"0.{d}" for d in range(10)} | {f"0.{d:02d}" for d in range(100)}
    complete |= {" " + text for text in complete}
    prefixes = {text[:end] for text in complete for end in range(len(text) + 1)}
    return frozenset(complete), frozenset(prefixes)


COMPLETE_PROBABILITIES, PROBABILITY_PREFIXES = _probability_strings()


def probability_tokens(tokenizer) -> dict[int, str]:
    """The tokens that can appear in a constrained answer (their text is digits, a point or a space), with their
    text: the table a ``ProbabilityConstraint`` searches at each step, built once per tokenizer."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[token] for token in range(size)])
    return {token: text for token, text in enumerate(texts) if text and len(text) <= 5 and set(text) <= set(" 0123456789.")}


class ProbabilityConstraint(_Mask):
    """A ``LogitsProcessor`` for one ``generate`` call: each row writes one of ``COMPLETE_PROBABILITIES`` and ends.

    Args:
        tokenizer: the policy's tokenizer.
        tokens: ``probability_tokens(tokenizer)`` (built here when None).
    """

    def __init__(self, tokenizer, tokens: dict[int, str] | None = None):
        self.tokens = probability_tokens(tokenizer) if tokens is None else tokens
        self.end = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        if not self.allowed([]):
            raise ValueError("ProbabilityConstraint: the tokenizer has no token that starts a probability")

    def written(self, new: Sequence[int]) -> str | None:
        """The answer text of ``new`` (the tokens written so far); None once it has ended or left the table."""
        text = ""
        for token in new:
            if token in self.end or token not in self.tokens:
                return None
            text += self.tokens[token]
        return text

    def allowed(self, new: Sequence[int]) -> list[int] | None:
        """The tokens allowed after ``new``; None once the answer has ended."""
        text = self.written(new)
        if text is None:
            return None
        allowed = [token for token, piece in self.tokens.items() if text + piece in PROBABILITY_PREFIXES]
        if text in COMPLETE_PROBABILITIES:
            allowed.append(self.eos)
        return allowed
