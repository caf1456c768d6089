"""Batched generation through transformers' ``generate`` (left padding, KV cache), and the yes/no scorer.

``generate`` sorts prompts by length so each batch pads little, runs them ``batch_size`` at a time, and
returns the completions in the input order with their token counts. ``yes_no_probability`` is the
token-probability scorer for small models that do not write calibrated numbers: one forward pass over
``prompt + completion + cue`` and ŷ = P(yes) / (P(yes) + P(no)) for the next token.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

ANSWER_CUE = "\nIs the outcome likely (yes or no)? Answer:"


@dataclass
class SamplingOptions:
    """Settings of one generation call.

    Args:
        max_new_tokens: the longest completion, in tokens.
        min_new_tokens: the shortest completion (end-of-text is suppressed before it; benchmarks use it).
        do_sample: sample (True) or decode greedily (False).
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: keep the k most likely tokens (0: all).
        repetition_penalty: >1 discourages repeating tokens.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generation_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "repetition_penalty": self.repetition_penalty}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: no sampling settings (transformers warns about unused ones)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Generation:
    """One completion: its text (special tokens removed), token counts, whether it ended by itself, and
    its new token ids (up to and including the end-of-text token)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool
    tokens: list[int] = field(default_factory=list)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _finish(tokenizer, tokens: list[int], eos: set[int], stop_strings: Optional[list[str]], prompt_tokens: int) -> Generation:
    """The ``Generation`` of one row of new tokens: cut at the first end-of-text, then at the first stop string."""
    length = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
    finished = length < len(tokens) or bool(tokens and tokens[length - 1] in eos)
    text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
    cut = min((k for k in (text.find(s) for s in stop_strings or ()) if k >= 0), default=-1)
    if cut >= 0:
        text, finished = text[:cut], True
    return Generation(text, prompt_tokens, length, finished, list(tokens[:length]))


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    options: SamplingOptions = SamplingOptions(),
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
    generator_seed: Optional[int] = None,
    stop_strings: Optional[list[str]] = None,
) -> list[Generation]:
    """Complete every prompt (already chat-templated text). Returns one ``Generation`` per prompt, in order.

    ``stop_strings``: a sequence stops at the first of them, and its text is cut just before it."""
    if not prompts:
        return []
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    was_training = model.training
    model.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(_device(model))
        extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        output = model.generate(**batch, **options.generation_kwargs(), **extra, pad_token_id=tokenizer.pad_token_id)
        new = output[:, batch["input_ids"].shape[1] :]  # [b, new]
        for row, i in enumerate(chunk):
            results[i] = _finish(tokenizer, new[row].tolist(), eos, stop_strings, len(encoded[i]))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return results  # type: ignore[return-value]


def _single_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    ids = set()
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) == 1:
            ids.add(tokens[0])
    return sorted(ids)


@torch.inference_mode()
def yes_no_probability(model, tokenizer, texts: list[str], batch_size: int = 8) -> list[float]:
    """P(yes) / (P(yes) + P(no)) for the token after each text (summed over spellings: yes, Yes, ' yes', ...)."""
    yes = _single_token_ids(tokenizer, ("yes", " yes", "Yes", " Yes", "YES", " YES"))
    no = _single_token_ids(tokenizer, ("no", " no", "No", " No", "NO", " NO"))
    if not yes or not no:
        raise ValueError("the tokenizer has no single-token 'yes'/'no': use the parse scorer")
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        logits = model(**batch.to(_device(model))).logits[:, -1].float()  # [b, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        p_yes = log_probs[:, yes].logsumexp(dim=-1)  # [b]
        p_no = log_probs[:, no].logsumexp(dim=-1)  # [b]
        out.extend(torch.sigmoid(p_yes - p_no).tolist())  # = P(yes) / (P(yes) + P(no))
    model.train(was_training)
    return out


class PromptCache:
    """The key/value cache of a set of prompts, computed once and reused by many generation calls.

    Stage 1 continues each patient's prompt (often 1-3k tokens) dozens of times; prefilling it once per
    search instead of once per sequence is what makes the search affordable on a CPU. The prompts are
    left-padded to one length; a call continues rows of that cache with continuations that are
    left-padded among themselves, so a sequence reads ``[pad | prompt | pad | continuation]`` with the
    pads masked and the positions counted over real tokens only (as transformers does for left padding).
    """

    @torch.inference_mode()
    def __init__(self, model, tokenizer, prompts: list[str]):
        from transformers import DynamicCache

        tokenizer.padding_side = "left"
        self.prompts = list(dict.fromkeys(prompts))
        self.row = {prompt: i for i, prompt in enumerate(self.prompts)}
        encoded = tokenizer(self.prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(_device(model))
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]  # [N, P]
        self.prompt_tokens = self.attention_mask.sum(-1).tolist()  # [N] real tokens per prompt
        longest = self.input_ids.shape[1]
        was_training = model.training
        model.eval()
        # one prompt at a time: causal attention without a padding mask (several times faster on a CPU
        # than one padded batch), then the caches are left-padded to one length and stacked
        per_prompt = []
        for row, length in enumerate(self.prompt_tokens):
            ids = self.input_ids[row : row + 1, longest - length :]  # [1, L]
            per_prompt.append(_layer_tensors(model(input_ids=ids, use_cache=True).past_key_values))
        model.train(was_training)
        layers = []
        for layer in range(len(per_prompt[0])):
            keys, values = [], []
            for row, length in enumerate(self.prompt_tokens):
                k, v = per_prompt[row][layer]  # [1, H, L, D]
                keys.append(torch.nn.functional.pad(k, (0, 0, longest - length, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, longest - length, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))  # [N, H, P, D]
        self.cache = DynamicCache(ddp_cache_data=layers)

    def select(self, rows: list[int]):
        """A copy of the cache holding ``rows`` (repeats allowed), for one generate call to extend."""
        cache = copy.deepcopy(self.cache)
        cache.reorder_cache(torch.tensor(rows, device=self.input_ids.device))
        return cache


def _layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer of a transformers cache (the layout changed in transformers 5)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


@torch.inference_mode()
def generate_continuations(
    model,
    tokenizer,
    prompt_cache: PromptCache,
    prompts: list[str],
    continuations: list[str],
    options: SamplingOptions = SamplingOptions(),
    batch_size: int = 8,
    stop_strings: Optional[list[str]] = None,
) -> list[Generation]:
    """Complete ``prompts[i] + continuations[i]`` for every i, reusing ``prompt_cache`` for the prompts.

    Same results as ``generate`` on the concatenated texts (up to float rounding), without prefilling the
    prompts again. Every prompt must be one of the cache's.
    """
    if not prompts:
        return []
    tokenizer.padding_side = "left"
    rows = [prompt_cache.row[p] for p in prompts]
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for c in continuations]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pad = tokenizer.pad_token_id
    device = _device(model)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        tail = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in chunk], device=device)  # [b, L]
        tail_mask = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        chunk_rows = [rows[i] for i in chunk]
        input_ids = torch.cat([prompt_cache.input_ids[chunk_rows], tail], dim=1)  # [b, P + L]
        attention_mask = torch.cat([prompt_cache.attention_mask[chunk_rows], tail_mask], dim=1)
        extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        with warnings.catch_warnings():  # transformers >= 5.2x renames past_key_values to cache; older ones need it
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=prompt_cache.select(chunk_rows),
            **options.generation_kwargs(),
            **extra,
            pad_token_id=pad,
            )
        new = output[:, input_ids.shape[1] :]
        for row, i in enumerate(chunk):
            prompt_tokens = prompt_cache.prompt_tokens[rows[i]] + len(encoded[i])
            results[i] = _finish(tokenizer, new[row].tolist(), eos, stop_strings, prompt_tokens)
    model.train(was_training)
    return results  # type: ignore[return-value]


@torch.inference_mode()
def sample_groups(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    options: SamplingOptions,
    batch_size: int = 8,
) -> list[list[Generation]]:
    """``group_size`` sampled completions of every prompt (RL rollouts): ``[prompt][g]``.

    Each prompt is prefilled once (``PromptCache``) and its cache is shared by the group's sequences;
    a ``generate`` call continues ``batch_size`` sequences from the prompts' last token."""
    if not prompts:
        return []
    cache = PromptCache(model, tokenizer, prompts)
    rows = [cache.row[p] for p in prompts for _ in range(group_size)]
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    results: list[Generation] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        past = cache.select(chunk)
        past.crop(-1)  # drop the last prompt column: generate feeds that token and goes on from it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            output = model.generate(
                input_ids=cache.input_ids[chunk],
                attention_mask=cache.attention_mask[chunk],
                past_key_values=past,
                **options.generation_kwargs(),
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, cache.input_ids.shape[1] :]  # [b, T]
        results.extend(_finish(tokenizer, new[row].tolist(), eos, None, cache.prompt_tokens[r]) for row, r in enumerate(chunk))
    model.train(was_training)
    return [results[p * group_size : (p + 1) * group_size] for p in range(len(prompts))]
