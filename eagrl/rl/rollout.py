"""Rollouts of stage 2: which completion tokens are key clinical tokens, and the policy's logits over
the completions with the prompt computed once per group.

- ``key_token_mask``: per completion token, whether it lies inside the ``<Important Features>`` span
  (the text after the tag up to the next tag). Token boundaries come from decoding the sampled ids
  themselves (not from re-tokenising the text), so the mask lines up with the tokens the loss sees; they
  are found in linear time (``token_ends``: incremental detokenisation).
- ``completion_logits`` / ``completion_hidden``: the logits [N, V] (or the final hidden states [N, D]: the fused
  linear loss projects them itself) of G completions of one prompt over their N tokens. The
  prompt (often 1-3k tokens of EHR) runs once, with gradient, and its key/value cache is repeated for
  the G completions, so a group costs one prompt forward + G short ones instead of G long ones (the
  gradient through the prompt is summed over the group by autograd). Only completion positions are
  projected onto the vocabulary.
"""

from __future__ import annotations

import inspect

import torch

from eagrl.llm.parsing import section_span

KEY_TAG = "Important Features"


def token_ends(tokenizer, tokens: list[int]) -> list[int]:
    """Per token, the end (in characters) of its text in ``decode(tokens)``, in linear time: each token's text
    comes from decoding a short window since the last complete character (incremental detokenisation), not
    the whole prefix. Falls back to one decode per prefix when the pieces do not add up to the whole (a
    tokenizer that drops a leading space at the start of a decode)."""
    ends, length, prefix, read = [], 0, 0, 0
    for k in range(len(tokens)):
        before = tokenizer.decode(tokens[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(tokens[prefix : k + 1], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # a complete character (not half a UTF-8 one)
            length += len(after) - len(before)
            prefix, read = read, k + 1
        ends.append(length)
    if not tokens or length == len(tokenizer.decode(tokens, skip_special_tokens=True)):
        return ends
    return [len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) for k in range(len(tokens))]


def key_token_mask(tokenizer, tokens: list[int], tag: str = KEY_TAG) -> list[bool]:
    """A bool per token of ``tokens``: inside the last ``<tag>`` section of their decoded text. All False
    when the tag is absent (the caller then falls back to every token)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    span = section_span(text, tag)
    if span is None or not tokens:
        return [False] * len(tokens)
    start, end = span
    mask, previous = [], 0
    for length in token_ends(tokenizer, tokens):
        mask.append(previous < end and length > start and length > previous)  # token chars [previous, length)
        previous = max(previous, length)
    return mask


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _cache_argument(decoder) -> str:
    """The name under which this transformers version takes a KV cache (``cache`` from 5.2x on)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def completion_logits(model, prompt_ids: list[int], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, V], ids [N])`` for the tokens of ``completions`` (G lists) after ``prompt_ids``.

    Row order: completion 0's tokens, then completion 1's, ... (each completion must be non-empty)."""
    hidden, ids = completion_hidden(model, prompt_ids, completions)
    logits = model.get_output_embeddings()(hidden)  # [N, V]
    config = getattr(model, "config", None)
    scale, cap = getattr(config, "logit_scale", None), getattr(config, "final_logit_softcapping", None)
    if scale:  # Cohere: as the model's own forward
        logits = logits * scale
    if cap:  # Gemma-2
        logits = torch.tanh(logits / cap) * cap
    return logits, ids


def completion_hidden(model, prompt_ids: list[int], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [N, D], ids [N])``: the final hidden states that predict the tokens of ``completions`` (the
    output layer's input; ``completion_logits`` projects them), for the fused linear loss."""
    device = model.get_output_embeddings().weight.device
    decoder = _decoder(model)
    group = len(completions)
    prefix = torch.tensor([prompt_ids[:-1]], device=device)  # [1, P - 1]
    cache = decoder(input_ids=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(group)  # [G, H, P - 1, D] per layer
    longest = max(len(c) for c in completions)
    tail = torch.zeros((group, longest), dtype=torch.long, device=device)  # [G, T]: last prompt token + completion[:-1]
    alive = torch.zeros((group, longest), dtype=torch.bool, device=device)  # [G, T] real completion positions
    targets = []
    for g, completion in enumerate(completions):
        row = [prompt_ids[-1], *completion[:-1]]
        tail[g, : len(row)] = torch.tensor(row, device=device)
        alive[g, : len(row)] = True
        targets.extend(completion)
    mask = torch.cat([torch.ones((group, prefix.shape[1]), dtype=torch.long, device=device), alive.long()], dim=1)  # [G, P - 1 + T]
    past = {_cache_argument(decoder): cache}
    hidden = decoder(input_ids=tail, attention_mask=mask, use_cache=True, **past).last_hidden_state  # [G, T, H]
    return hidden[alive], torch.tensor(targets, dtype=torch.long, device=device)  # [N, D], [N]
