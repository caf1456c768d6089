"""Batched generation, and the yes/no scorer.

Every generation path (evaluation, distillation, RL rollouts) runs on one engine (``Engine``):

1. **prefill** each prompt on its own (no padding), ``prefill_chunk`` tokens per forward, computing the
   logits of the last position only; the per-prompt caches are left-padded to one length and stacked;
2. **decode** the batch with transformers' ``generate`` continuing that cache (its logits processors,
   sampling and stop strings), in a ``StaticCache`` (preallocated, written in place) or a ``DynamicCache``
   (concatenated every step);
3. in the engine's ``dtype``: a copy of the weights in that dtype when it differs from the model's
   (``generation_weights``); the trained weights are never cast. ``choose_dtype`` picks it by measuring.

On this project's 2-core CPU the static cache decodes SmolLM2 batches of length-varying prompts ~2x faster
than plain ``generate`` on a padded batch (``benchmarks/generation.py``). ``engine=None`` is the plain call
(kept as the reference the tests and the benchmark compare against).

``generate`` sorts prompts by length so each batch pads little, runs them ``batch_size`` at a time, and
returns the completions in the input order with their token counts. ``yes_no_probability`` is the
token-probability scorer for small models that do not write calibrated numbers: one forward pass over
``prompt + completion + cue`` and ŷ = P(yes) / (P(yes) + P(no)) for the next token.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Literal, Optional

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
    """One completion: its text (special tokens removed), token counts, whether it ended by itself, its
    new token ids (up to and including the end-of-text token) and, where asked for, the sampler's log-prob
    of each of them (``log_softmax(logits / temperature)``, the distribution it was sampled from)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finished: bool
    tokens: list[int] = field(default_factory=list)
    logprobs: Optional[list[float]] = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Engine:
    """How generation runs (see the module docstring).

    Args:
        dtype: the dtype of the generation weights, activations and cache.
        prefill_chunk: prompt tokens per prefill forward (bounds the activation memory of long prompts; 0: the
            whole prompt at once).
        decode_cache: ``static`` (preallocated, written in place) or ``dynamic`` (grown by concatenation).
        dtype_choice: how ``dtype`` was chosen (``explicit``, or the measured matmul rates of ``auto``).
    """

    dtype: torch.dtype = torch.float32
    prefill_chunk: int = 1024
    decode_cache: Literal["static", "dynamic"] = "static"
    dtype_choice: str = "explicit"

    def describe(self) -> dict:
        """What ``metrics.json`` records under ``generation``."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_choice": self.dtype_choice,
            "prefill_chunk": self.prefill_chunk,
            "decode_cache": self.decode_cache,
        }


_MEASURED: dict[str, tuple[float, float]] = {}
STATIC_BUCKET = 256
"""Static caches are sized in multiples of this many positions."""


def matmul_rates(device: torch.device | str = "cpu", size: tuple[int, int, int] = (256, 576, 1536), repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of a float32 and a bfloat16 linear layer (``[m, k] x [n, k]^T``, as the models run them) on
    ``device``, measured once per process (~0.1 s on a CPU; a bf16 run far slower than fp32 stops early)."""
    device = torch.device(device)
    key = str(device)
    if key not in _MEASURED:
        m, k, n = size
        rates, budget = [], None
        generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: a resumed run must match
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, device=device, generator=generator).to(dtype)
            w = torch.randn(n, k, device=device, generator=generator).to(dtype)
            torch.nn.functional.linear(x, w)  # warm-up
            done, start = 0, time.perf_counter()
            while done < repeats:
                torch.nn.functional.linear(x, w)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                done += 1
                if budget is not None and time.perf_counter() - start > budget:  # already > 5x slower: enough
                    break
            elapsed = time.perf_counter() - start
            budget = budget or 5 * elapsed
            rates.append(2 * m * k * n * done / elapsed / 1e9)
        _MEASURED[key] = (rates[0], rates[1])
    return _MEASURED[key]


def choose_dtype(requested: str, device: torch.device | str = "cpu", rates: tuple[float, float] | None = None) -> tuple[torch.dtype, str]:
    """``(dtype, how it was chosen)``. An explicit dtype always wins. ``auto``: bfloat16 on a CUDA GPU that
    supports it; on a CPU, bfloat16 only where a matmul micro-benchmark (``rates``: fp32 and bf16 GFLOP/s,
    measured when not given) runs it at least 1.2x faster than float32, else float32."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"generation dtype {requested!r}: expected auto or one of {sorted(DTYPES)}")
        return DTYPES[requested], "explicit"
    device = torch.device(device)
    if device.type == "cuda":
        return (torch.bfloat16, "auto: cuda") if torch.cuda.is_bf16_supported() else (torch.float16, "auto: cuda without bf16")
    fp32, bf16 = rates if rates is not None else matmul_rates(device)
    chosen = torch.bfloat16 if bf16 >= 1.2 * fp32 else torch.float32
    return chosen, f"auto: matmul float32 {fp32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s"


_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generation_weights(model, dtype: torch.dtype):
    """``model`` itself when its weights are in ``dtype``; else a copy of it with its parameters in ``dtype``
    (buffers unchanged), kept per model, whose trainable parameters are refreshed from the model's at every
    call (so a policy that was just updated samples as it is now; frozen weights never change)."""
    first = next(model.parameters())
    if first.dtype == dtype or not first.is_floating_point():
        return model
    copy_ = _COPIES.get(model)
    if copy_ is None:
        copy_ = copy.deepcopy(model)
        for param in copy_.parameters():  # parameters only: buffers (RoPE's inv_freq) keep their precision
            param.data = param.data.to(dtype)
            param.requires_grad_(False)
        _COPIES[model] = copy_
    else:
        with torch.no_grad():  # the trainable weights (LoRA, or all in a full fine-tune) are what an update changes
            for target, source in zip(copy_.parameters(), model.parameters()):
                if source.requires_grad:
                    target.copy_(source)
    copy_.train(model.training)
    return copy_


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


@contextlib.contextmanager
def _quiet_cache_warning():
    """transformers >= 5.2x renames ``past_key_values`` to ``cache`` (older ones need the old name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


def prefill(model, encoded: list[list[int]], chunk: int = 1024) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """Key/value tensors of every prompt, each prefilled alone (no padding) ``chunk`` tokens per forward,
    then left-padded to the longest and stacked: ``([(keys, values)] per layer, each [N, H, P, D], lengths)``."""
    from transformers import DynamicCache

    device = _device(model)
    lengths = [len(ids) for ids in encoded]
    longest = max(lengths)
    per_prompt = []
    with _quiet_cache_warning():
        for ids in encoded:
            cache = DynamicCache()
            step = chunk if chunk and chunk > 0 else len(ids)
            for start in range(0, len(ids), step):
                piece = torch.tensor([ids[start : start + step]], device=device)  # [1, chunk]
                model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            per_prompt.append(_layer_tensors(cache))
    layers = []
    for layer in range(len(per_prompt[0])):
        keys, values = [], []
        for row, length in enumerate(lengths):
            k, v = per_prompt[row][layer]  # [1, H, L, D]
            keys.append(torch.nn.functional.pad(k, (0, 0, longest - length, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, longest - length, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))  # [N, H, P, D]
    return layers, lengths


def continuing_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]], used: int, room: int, kind: str = "static"):
    """A transformers cache holding the first ``used`` positions of ``layers`` ([B, H, P, D] each), with room
    for ``room`` more tokens: a ``StaticCache`` (``kind="static"``; a ``DynamicCache`` where this transformers
    cannot build one) or a ``DynamicCache``."""
    from transformers import DynamicCache

    if kind == "static":
        size = -(-(used + room) // STATIC_BUCKET) * STATIC_BUCKET  # a few sizes, so a compiled decode step is reused
        try:
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=size)
        except (ImportError, TypeError):  # transformers < 4.5x: another signature
            cache = None
        if cache is not None:
            positions = torch.arange(used, device=layers[0][0].device)
            for i, (k, v) in enumerate(layers):
                cache.update(k[:, :, :used], v[:, :, :used], i, {"cache_position": positions})
            if int(cache.get_seq_length()) == used:  # some transformers versions count non-zero keys of row 0,
                return cache  # which a left-padded row 0 miscounts: those fall back to the dynamic cache
    return DynamicCache(ddp_cache_data=[(k[:, :, :used], v[:, :, :used]) for k, v in layers])


class _SampledLogprobs:
    """A logits processor, last in the list, that keeps the log-prob of each sampled token under the scores it
    sees (the distribution the token is drawn from) without keeping the scores: at step t it reads the token
    drawn at step t − 1 from ``input_ids`` and looks it up in the previous step's log-softmax ([B, V], one)."""

    def __init__(self):
        self.previous: Optional[torch.Tensor] = None  # [B, V]
        self.steps: list[torch.Tensor] = []  # T − 1 x [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, new: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of ``new`` [B, T], the tokens generated."""
        if self.previous is not None and len(self.steps) < new.shape[1]:  # the last token: no call after it
            self.steps.append(self.previous.gather(-1, new[:, len(self.steps) : len(self.steps) + 1]).squeeze(-1))
        return torch.stack(self.steps, dim=1) if self.steps else new.new_zeros((new.shape[0], 0), dtype=torch.float)


def _decode(
    model, tokenizer, input_ids, attention_mask, cache, options: SamplingOptions, stop_strings, want_logprobs: bool, constraint=None
):
    """``generate`` continuing ``cache``; returns (new ids [B, T], sampler log-probs [B, T] or None).

    With ``want_logprobs``, the temperature is applied by our own processor ahead of the recorder (transformers
    orders its own warpers after custom processors in some versions and before in others). ``constraint``: a
    factory of a logits processor that masks disallowed tokens (``eagrl.llm.constrained``); it runs after our own
    temperature, and top_p/top_k are not applied (they could leave no allowed token)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    kwargs = options.generation_kwargs()
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    recorder = None
    processors = []
    if want_logprobs:
        recorder = _SampledLogprobs()
        processors.append(recorder)
    if constraint is not None:
        processors.insert(0, constraint())
        kwargs.pop("min_new_tokens", None)  # the end may be the only allowed token
        if options.do_sample:
            kwargs.update(top_p=1.0, top_k=0)
    if processors:
        if options.do_sample and options.temperature != 1.0:
            processors.insert(0, TemperatureLogitsWarper(options.temperature))
            kwargs["temperature"] = 1.0
        extra["logits_processor"] = LogitsProcessorList(processors)
    with _quiet_cache_warning():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            **kwargs,
            **extra,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[:, input_ids.shape[1] :]
    return new, (recorder.result(new) if recorder is not None else None)


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
    engine: Optional[Engine] = Engine(),
    constraint=None,
) -> list[Generation]:
    """Complete every prompt (already chat-templated text). Returns one ``Generation`` per prompt, in order.

    ``stop_strings``: a sequence stops at the first of them, and its text is cut just before it.
    ``engine``: how to prefill and decode (module docstring); None: one plain ``model.generate`` call per
    padded batch (the reference). ``constraint``: a factory of a masking logits processor (``_decode``)."""
    if not prompts:
        return []
    if constraint is not None and engine is None:
        raise ValueError("generate: a constraint needs the engine (engine=None is the unconstrained reference)")
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Optional[Generation]] = [None] * len(prompts)
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    was_training = model.training
    runner = model if engine is None else generation_weights(model, engine.dtype)
    runner.eval()
    model.eval()
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(_device(model))
        if engine is None:
            extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
            output = model.generate(**batch, **options.generation_kwargs(), **extra, pad_token_id=tokenizer.pad_token_id)
            new = output[:, batch["input_ids"].shape[1] :]  # [b, new]
        else:
            layers, _ = prefill(runner, [encoded[i] for i in chunk], engine.prefill_chunk)
            longest = batch["input_ids"].shape[1]
            cache = continuing_cache(runner, layers, longest - 1, options.max_new_tokens + 1, engine.decode_cache)
            new, _ = _decode(runner, tokenizer, batch["input_ids"], batch["attention_mask"], cache, options, stop_strings, False, constraint)
        for row, i in enumerate(chunk):
            results[i] = _finish(tokenizer, new[row].tolist(), eos, stop_strings, len(encoded[i]))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    runner.train(was_training)
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
    prefilled one at a time (``prefill``) and left-padded to one length; a call continues rows of that cache
    with continuations that are left-padded among themselves, so a sequence reads
    ``[pad | prompt | pad | continuation]`` with the pads masked and the positions counted over real tokens
    only (as transformers does for left padding).
    """

    @torch.inference_mode()
    def __init__(self, model, tokenizer, prompts: list[str], engine: Engine = Engine()):
        tokenizer.padding_side = "left"
        self.engine = engine
        self.prompts = list(dict.fromkeys(prompts))
        self.row = {prompt: i for i, prompt in enumerate(self.prompts)}
        encoded = tokenizer(self.prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(_device(model))
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]  # [N, P]
        self.prompt_tokens = self.attention_mask.sum(-1).tolist()  # [N] real tokens per prompt
        longest = self.input_ids.shape[1]
        runner = generation_weights(model, engine.dtype)
        was_training = runner.training
        runner.eval()
        ids = [self.input_ids[row, longest - length :].tolist() for row, length in enumerate(self.prompt_tokens)]
        self.layers, _ = prefill(runner, ids, engine.prefill_chunk)  # [(keys, values)] each [N, H, P, D]
        runner.train(was_training)

    def select(self, model, rows: list[int], used: int, room: int):
        """A cache holding ``rows`` (repeats allowed) of the first ``used`` prompt positions, with ``room`` for
        more tokens, for one generate call to extend."""
        index = torch.tensor(rows, device=self.input_ids.device)
        layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]
        return continuing_cache(model, layers, used, room, self.engine.decode_cache)


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
    constraint=None,
) -> list[Generation]:
    """Complete ``prompts[i] + continuations[i]`` for every i, reusing ``prompt_cache`` for the prompts.

    Same results as ``generate`` on the concatenated texts (up to float rounding), without prefilling the
    prompts again. Every prompt must be one of the cache's. ``constraint``: as in ``generate``.
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
    runner = generation_weights(model, prompt_cache.engine.dtype)
    was_training = model.training
    runner.eval()
    used = prompt_cache.input_ids.shape[1]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in chunk)
        tail = torch.tensor([[pad] * (longest - len(encoded[i])) + encoded[i] for i in chunk], device=device)  # [b, L]
        tail_mask = torch.tensor([[0] * (longest - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        chunk_rows = [rows[i] for i in chunk]
        input_ids = torch.cat([prompt_cache.input_ids[chunk_rows], tail], dim=1)  # [b, P + L]
        attention_mask = torch.cat([prompt_cache.attention_mask[chunk_rows], tail_mask], dim=1)
        cache = prompt_cache.select(runner, chunk_rows, used, longest + options.max_new_tokens + 1)
        new, _ = _decode(runner, tokenizer, input_ids, attention_mask, cache, options, stop_strings, False, constraint)
        for row, i in enumerate(chunk):
            prompt_tokens = prompt_cache.prompt_tokens[rows[i]] + len(encoded[i])
            results[i] = _finish(tokenizer, new[row].tolist(), eos, stop_strings, prompt_tokens)
    runner.train(was_training)
    return results  # type: ignore[return-value]


@torch.inference_mode()
def sample_groups(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    options: SamplingOptions,
    batch_size: int = 8,
    engine: Engine = Engine(),
    logprobs: bool = False,
) -> list[list[Generation]]:
    """``group_size`` sampled completions of every prompt (RL rollouts): ``[prompt][g]``.

    Each prompt is prefilled once (``PromptCache``) and its cache is shared by the group's sequences;
    a ``generate`` call continues ``batch_size`` sequences from the prompts' last token. ``logprobs``: also
    keep the sampler's log-prob of every new token (``Generation.logprobs``)."""
    if not prompts:
        return []
    cache = PromptCache(model, tokenizer, prompts, engine)
    rows = [cache.row[p] for p in prompts for _ in range(group_size)]
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    results: list[Generation] = []
    runner = generation_weights(model, engine.dtype)
    was_training = model.training
    runner.eval()
    used = cache.input_ids.shape[1] - 1  # generate feeds the last prompt token and goes on from it
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        past = cache.select(runner, chunk, used, options.max_new_tokens + 1)
        new, sampled = _decode(runner, tokenizer, cache.input_ids[chunk], cache.attention_mask[chunk], past, options, None, logprobs)  # [b, T] each
        for row, r in enumerate(chunk):
            generation = _finish(tokenizer, new[row].tolist(), eos, None, cache.prompt_tokens[r])
            if sampled is not None:
                generation.logprobs = sampled[row, : generation.new_tokens].tolist()
            results.append(generation)
    runner.train(was_training)
    return [results[p * group_size : (p + 1) * group_size] for p in range(len(prompts))]
