"""The generation engine (eagrl.llm.generation): every path gives plain ``generate``'s greedy tokens in
float32, the dtype is chosen by measurement unless given, a bf16 copy samples as the fp32 policy now is,
and the sampler's log-probs are the training forward's (``train/logp_mismatch``)."""

from __future__ import annotations

import pytest
import torch

from eagrl.llm.generation import (
    Engine,
    PromptCache,
    SamplingOptions,
    choose_dtype,
    generate,
    generate_continuations,
    generation_weights,
    sample_groups,
)
from eagrl.llm.prompts import build_prompt
from eagrl.models.backbone import BackboneOptions, generation_engine, load_backbone, tiny_random_llama
from eagrl.errors import EAGRLInputError

ENGINES = {
    "static": Engine(decode_cache="static"),
    "dynamic": Engine(decode_cache="dynamic"),
    "chunked-prefill": Engine(prefill_chunk=7),
}


def _prompts(tokenizer) -> list[str]:
    texts = [f"The patient is aged {a} years." for a in (30, 55, 81)] + ["A longer text: " + "heart rate high, " * 9]
    return [build_prompt(tokenizer, t, "tjh", "mortality", "vanilla") for t in texts]


def _plain(model, tokenizer, prompt: str, new: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_generate_path_gives_plain_greedy_tokens(tokenizer, tiny, name):
    prompts = _prompts(tokenizer)
    options = SamplingOptions(max_new_tokens=8, min_new_tokens=8)
    ours = generate(tiny, tokenizer, prompts, options, batch_size=3, engine=ENGINES[name])  # padded batches of 3 and 1
    reference = generate(tiny, tokenizer, prompts, options, batch_size=3, engine=None)  # one plain call per padded batch
    for prompt, out, ref in zip(prompts, ours, reference):
        assert out.tokens == _plain(tiny, tokenizer, prompt, 8) == ref.tokens


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_cached_prompt_continuations_and_groups_give_plain_greedy_tokens(tokenizer, tiny, kind):
    prompts = _prompts(tokenizer)
    engine = Engine(decode_cache=kind, prefill_chunk=5)
    options = SamplingOptions(max_new_tokens=6, min_new_tokens=6)
    cache = PromptCache(tiny, tokenizer, prompts, engine)
    tails = ["<Subquestion>", "<Subquestion> Is the heart rate", "", "<Final Answer>"]
    continued = generate_continuations(tiny, tokenizer, cache, prompts, tails, options, batch_size=3)
    for prompt, tail, out in zip(prompts, tails, continued):
        assert out.tokens == _plain(tiny, tokenizer, prompt + (tail or tokenizer.eos_token), 6)
    groups = sample_groups(tiny, tokenizer, prompts, 2, options, batch_size=3, engine=engine)  # greedy: both equal
    for prompt, group in zip(prompts, groups):
        assert [g.tokens for g in group] == [_plain(tiny, tokenizer, prompt, 6)] * 2


def test_an_explicit_dtype_wins_and_auto_follows_the_measured_rates():
    assert choose_dtype("float32", "cpu", rates=(10.0, 400.0)) == (torch.float32, "explicit")
    assert choose_dtype("bfloat16", "cpu", rates=(400.0, 10.0)) == (torch.bfloat16, "explicit")
    dtype, how = choose_dtype("auto", "cpu", rates=(150.0, 20.0))  # a CPU without bf16 instructions
    assert dtype == torch.float32 and "150" in how and "20" in how
    assert choose_dtype("auto", "cpu", rates=(150.0, 635.0))[0] == torch.bfloat16  # one with AVX-512 BF16
    assert choose_dtype("auto", "cpu", rates=(150.0, 170.0))[0] == torch.float32  # within 1.2x: not worth the rounding
    engine = generation_engine(BackboneOptions(generation_dtype="bfloat16", prefill_chunk=0, decode_cache="dynamic"))
    assert engine.describe() == {"dtype": "bfloat16", "dtype_choice": "explicit", "prefill_chunk": 0, "decode_cache": "dynamic"}
    with pytest.raises(EAGRLInputError, match="prefill_chunk"):
        generation_engine(BackboneOptions(prefill_chunk=-1))


def test_a_bf16_generation_copy_follows_the_fp32_weights(tokenizer):
    model = tiny_random_llama(tokenizer, seed=1)
    copy_ = generation_weights(model, torch.bfloat16)
    assert copy_ is not model and next(model.parameters()).dtype == torch.float32  # the trained weights stay fp32
    assert all(p.dtype == torch.bfloat16 for p in copy_.parameters())
    rope = [b for n, b in copy_.named_buffers() if n.endswith("inv_freq")]
    assert rope and all(b.dtype == torch.float32 for b in rope)  # RoPE's frequencies keep their precision
    assert generation_weights(model, torch.float32) is model
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimiser step
    again = generation_weights(model, torch.bfloat16)
    assert again is copy_
    torch.testing.assert_close(next(again.parameters()).float(), next(model.parameters()).to(torch.bfloat16).float())


def test_sampler_logprobs_are_the_training_forwards(tokenizer, tiny):
    prompts = _prompts(tokenizer)[:2]
    options = SamplingOptions(max_new_tokens=5, do_sample=True, temperature=0.7)
    torch.manual_seed(0)
    groups = sample_groups(tiny, tokenizer, prompts, 2, options, batch_size=4, logprobs=True)
    for prompt, group in zip(prompts, groups):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for g in group:
            ids = torch.tensor([prompt_ids + g.tokens])
            with torch.no_grad():
                logits = tiny(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # [T, V]
            train = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(g.tokens)[:, None]).squeeze(-1)
            assert len(g.logprobs) == len(g.tokens)
            torch.testing.assert_close(torch.tensor(g.logprobs), train, atol=1e-4, rtol=0)
    bf16 = sample_groups(tiny, tokenizer, prompts[:1], 1, options, 4, Engine(dtype=torch.bfloat16), logprobs=True)[0][0]
    assert bf16.logprobs is not None and len(bf16.logprobs) == len(bf16.tokens)
    prompt_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the fp32 policy's log-probs of the bf16 sampler's tokens: close, not equal
        logits = tiny(input_ids=torch.tensor([prompt_ids + bf16.tokens])).logits[0, len(prompt_ids) - 1 : -1]
    train = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(bf16.tokens)[:, None]).squeeze(-1)
    gap = (torch.tensor(bf16.logprobs) - train).abs().mean()
    assert 0 < gap < 0.5  # what train/logp_mismatch reports for a bf16 sampler


@pytest.mark.slow
def test_bf16_greedy_tokens_on_smollm2_mostly_match_fp32(tmp_path_factory):
    """In bf16, the first 8 greedy tokens of SmolLM2 equal the fp32 ones for at least 3 of 4 prompts."""
    model, tokenizer = load_backbone()
    texts = [
        "The patient is a male, aged 71 years. Heart rate 128 bpm H; oxygen saturation 86 % L.",
        "The patient is a female, aged 34 years. Every measured feature was within the normal range.",
        "The patient is a male, aged 58 years. Lactate dehydrogenase 612 U/L H; lymphocyte count 0.4 x10^9/L L.",
        "The patient is a female, aged 80 years. Systolic blood pressure 84 mmHg L; GCS total 9 points L.",
    ]
    prompts = [build_prompt(tokenizer, t, "tjh", "mortality", "vanilla") for t in texts]
    options = SamplingOptions(max_new_tokens=8, min_new_tokens=8)
    fp32 = generate(model, tokenizer, prompts, options, batch_size=4, engine=None)
    bf16 = generate(model, tokenizer, prompts, options, batch_size=4, engine=Engine(dtype=torch.bfloat16))
    equal = sum(a.tokens == b.tokens for a, b in zip(fp32, bf16))
    assert equal >= 3, [(a.text, b.text) for a, b in zip(fp32, bf16)]


def test_measuring_the_dtypes_leaves_the_global_random_state_alone():
    from eagrl.llm import generation

    generation._MEASURED.pop("cpu", None)
    state = torch.random.get_rng_state()
    generation.matmul_rates("cpu", size=(16, 32, 48), repeats=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # else a resumed run would sample differently
