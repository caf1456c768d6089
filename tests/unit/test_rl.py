"""Stage 2's maths and update on tiny inputs: advantages, ε(τ), dynamic sampling, the clipped surrogate
against its formula, key-token masks, the shared-prompt forward, and a few updates raising a reward."""

from __future__ import annotations

import math

import pytest
import torch

from eagrl.errors import EAGRLInputError
from eagrl.llm.generation import SamplingOptions, sample_groups
from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
from eagrl.rl.grpo import Rollout, clip_high_from_entropy, clipped_surrogate, group_advantages, keep_varied_groups, masked_mean
from eagrl.rl.rollout import completion_logits, key_token_mask
from eagrl.rl.step import UpdateConfig, clip_bounds, optimise


def test_group_advantages_normalise_within_groups_and_equal_rewards_give_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [-4.6, -4.6, -4.6, -4.6]])
    a = group_advantages(rewards)
    expected = (rewards[0] - 0.5) / (rewards[0].std() + 1e-6)
    assert torch.allclose(a[0], expected)
    assert torch.equal(a[1:], torch.zeros(2, 4))  # all equal: zero, not NaN nor eps-blown noise
    assert torch.isfinite(a).all()


def test_dynamic_sampling_keeps_groups_with_reward_variance():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.2, 0.2]])
    assert keep_varied_groups(rewards).tolist() == [False, True, False]


def test_clip_high_from_entropy_maps_min_max_into_the_range():
    eps = clip_high_from_entropy(torch.tensor([0.5, 1.5, 1.0, 2.5]), 0.2, 0.4)
    assert torch.allclose(eps, torch.tensor([0.2, 0.3, 0.25, 0.4]))
    assert torch.allclose(clip_high_from_entropy(torch.tensor([0.7, 0.7]), 0.2, 0.4), torch.tensor([0.3, 0.3]))  # midpoint
    h = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not clip_high_from_entropy(h, 0.2, 0.4).requires_grad  # the bound carries no gradient


def test_masked_mean_falls_back_to_all_tokens_without_a_key_span():
    values = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0])
    mask = torch.tensor([False, True, True, False, False])
    segments = torch.tensor([0, 0, 0, 1, 1])
    assert masked_mean(values, mask, segments, 2).tolist() == [4.0, 3.0]


def test_clipped_surrogate_matches_the_formula_by_hand():
    # five tokens: A > 0 inside the clip, A > 0 above 1 + eps_high (clipped high), A < 0 below 1 - eps_low
    # (clipped low), A < 0 above (not clipped: min picks r·A), A > 0 below (not clipped)
    ratio = torch.tensor([1.1, 1.5, 0.6, 1.5, 0.6], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.0, -0.5, 0.5], dtype=torch.float64)
    eps_high = torch.tensor([0.3, 0.3, 0.3, 0.28, 0.3], dtype=torch.float64)
    old = torch.log(torch.tensor([0.2, 0.3, 0.4, 0.1, 0.5], dtype=torch.float64))
    logp = (old + ratio.log()).requires_grad_()
    weights = torch.full((5,), 1 / 8, dtype=torch.float64)  # token-mean over 8 tokens in the batch
    loss, stats = clipped_surrogate(logp, old, adv, weights, 0.2, eps_high)
    per_token = [-1.1 * 1.0, -1.3 * 2.0, -0.8 * -1.0, -1.5 * -0.5, -0.6 * 0.5]
    assert math.isclose(float(loss.detach()), sum(per_token) / 8, rel_tol=1e-12)
    loss.backward()
    # d/dlogp: -A·r·w where the clip is not active, 0 where it is
    expected = torch.tensor([-1.0 * 1.1, 0.0, 0.0, 0.5 * 1.5, -0.5 * 0.6], dtype=torch.float64) / 8
    assert torch.allclose(logp.grad, expected)
    assert math.isclose(float(stats["clip_high"]), 1 / 5, rel_tol=1e-6) and math.isclose(float(stats["clip_low"]), 1 / 5, rel_tol=1e-6)


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    zero = torch.zeros(2)
    loss, stats = clipped_surrogate(logp, logp, zero, torch.ones(2), 0.2, 0.2, ref_logp=logp, kl_coef=1.0)
    assert float(loss) == 0.0 and float(stats["kl"]) == 0.0
    loss, stats = clipped_surrogate(logp, logp, zero, torch.ones(2), 0.2, 0.2, ref_logp=logp - 0.3, kl_coef=1.0)
    assert float(stats["kl"]) > 0 and float(loss) > 0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=8, alpha=16, dropout=0.0)))


def test_key_token_mask_marks_the_important_features_span(tiny):
    _, tokenizer = tiny
    text = "<Subquestion> Age? <Answer> 70 <Important Features> Age, Lymphocyte count <Final Answer> 0.8"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = key_token_mask(tokenizer, tokens)
    marked = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    assert "Age, Lymphocyte count" in marked and "0.8" not in marked and "Subquestion" not in marked
    assert not any(key_token_mask(tokenizer, tokenizer("no tags here", add_special_tokens=False)["input_ids"]))


def test_shared_prompt_forward_equals_one_forward_per_sequence(tiny):
    model, tokenizer = tiny
    prompt = tokenizer("Patient record: age 70, fever.", add_special_tokens=False)["input_ids"]
    completions = [[5, 6, 7], [8], [9, 10, 11, 12]]
    logits, ids = completion_logits(model, prompt, completions)
    expected = torch.cat(
        [model(input_ids=torch.tensor([prompt + c])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(c)] for c in completions]
    )
    assert ids.tolist() == [t for c in completions for t in c]
    assert torch.allclose(logits, expected, atol=1e-5)


def _first_token_rollout(model, tokenizer, prompt_ids, prompt, target, group):
    sampling = SamplingOptions(max_new_tokens=3, do_sample=True, top_k=2)
    completions = [g.tokens for g in sample_groups(model, tokenizer, [prompt], group, sampling, group)[0]]
    rewards = torch.tensor([1.0 if c[0] == target else 0.0 for c in completions])
    flags = torch.ones(group, dtype=torch.bool)
    advantages = group_advantages(rewards.view(1, group)).flatten()
    keys = [[False] * len(c) for c in completions]
    return Rollout([prompt_ids], completions, [""] * group, rewards, rewards, rewards, flags, advantages, keys, group)


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_few_updates_raise_a_reward_that_favours_one_answer(adaptive):
    """Reward 1 when the first token is the model's second most likely one (sampling from the top 2):
    after a few updates that token's probability has risen."""
    torch.manual_seed(0)
    model, tokenizer = load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=8, alpha=16, dropout=0.0)))
    prompt = "The patient is stable. Answer:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def first_token_probs():
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0, -1], -1)

    target = int(first_token_probs().argsort(descending=True)[1])
    before = float(first_token_probs()[target])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    config = UpdateConfig(adaptive_clip=adaptive, backend="torch")
    for _ in range(5):
        stats = optimise(model, optimizer, _first_token_rollout(model, tokenizer, prompt_ids, prompt, target, 8), config)
        assert math.isfinite(stats["loss"]) and 0.2 <= stats["eps_high"] <= 0.4
    after = float(first_token_probs()[target])
    assert after > 1.3 * before


def test_two_ppo_epochs_clip_the_second_pass(tiny):
    model, tokenizer = tiny
    prompt = "Answer:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rollout = _first_token_rollout(model, tokenizer, prompt_ids, prompt, prompt_ids[-1], 4)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    stats = optimise(model, optimizer, rollout, UpdateConfig(ppo_epochs=2, adaptive_clip=False, backend="torch"))
    assert stats["ratio"] != 1.0  # the second pass sees a moved policy against the first pass's log-probs


def test_clip_bounds_normalise_over_the_whole_batch():
    rollout = Rollout(
        prompt_ids=[[1], [2]],
        completions=[[1, 2], [3], [4], [5, 6]],
        texts=[""] * 4,
        rewards=torch.zeros(4),
        r_cls=torch.zeros(4),
        r_att=torch.zeros(4),
        parsed=torch.ones(4, dtype=torch.bool),
        advantages=torch.zeros(4),
        key_mask=[[True, False], [False], [False], [False, True]],
        group_size=2,
    )
    entropies = [torch.tensor([1.0, 9.0, 2.0]), torch.tensor([3.0, 7.0, 5.0])]
    # key-token means: 1.0 (first token), 2.0 (all), 3.0 (all), 5.0 (second token)
    assert torch.allclose(clip_bounds(rollout, entropies, UpdateConfig()), torch.tensor([0.2, 0.25, 0.3, 0.4]))


# ------------------------------------------------------------------------------------------- module
def _module(**overrides):
    from lightning_modules.rl import RLModule

    kwargs = {"backbone": BackboneOptions(name="tiny-random-llama", lora=LoraOptions(dropout=0.0)), "reward": {"use_attention": False}}
    kwargs.update(overrides)
    from eagrl.rl.rewards import RewardConfig

    kwargs["reward"] = RewardConfig(**kwargs["reward"])
    return RLModule(**kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"eps_min": 0.5, "eps_max": 0.3}, "eps_min .* must not exceed"),
        ({"backbone": BackboneOptions(name="runs/tjh/sft/model/merged-missing", lora=LoraOptions(dropout=0.0))}, "does not exist: stage 2 starts"),
        ({"init_adapter": "/nonexistent/adapter"}, "model.init_adapter: /nonexistent/adapter does not exist"),
        ({"rollout_sampling": SamplingOptions(do_sample=False)}, "do_sample must be true"),
        ({"reward": {"use_attention": True}}, "expert_attention"),
    ],
)
def test_bad_settings_fail_before_training(overrides, message):
    with pytest.raises(EAGRLInputError, match=message):
        _module(**overrides)


def test_the_fused_linear_update_equals_the_logits_path():
    """``loss_backend: fused_linear`` (the loss from the hidden states, in chunks) takes the update of the logits
    path: the same statistics and the same LoRA weights after two mini-batch steps with both clips free to act."""
    from eagrl.kernels.fused_linear import fused_linear_policy_loss

    updated = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model, tokenizer = load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=4, alpha=8, dropout=0.0)))
        model.double()  # float64: at lr 20, float32 round-off (which depends on the thread count) moved a weight by 2e-5
        prompt = "The patient is stable. Answer:"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        torch.manual_seed(1)
        rollout = _first_token_rollout(model, tokenizer, prompt_ids, prompt, prompt_ids[-1], 4)
        rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        calls = []

        def spy(*args, **kwargs):
            calls.append(1)
            return fused_linear_policy_loss(*args, **kwargs)

        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=20.0)
        config = UpdateConfig(ppo_epochs=2, mini_batch_size=2, backend="torch", fused_linear=fused, chunk_size=3)
        stats = optimise(model, optimizer, rollout, config, linear_loss_fn=spy)
        assert bool(calls) == fused  # the option routes the loss
        updated[fused] = (stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (stats_logits, weights_logits), (stats_fused, weights_fused) = updated[False], updated[True]
    for name in ("loss", "clip_low", "clip_high", "ratio", "entropy", "eps_high"):
        assert stats_fused[name] == pytest.approx(stats_logits[name], rel=1e-4, abs=1e-6), name
    assert stats_logits["ratio"] != 1.0
    for name, value in weights_logits.items():
        torch.testing.assert_close(weights_fused[name], value, atol=1e-9, rtol=1e-7)


def test_the_warnings_the_rl_module_silences_are_the_ones_torch_and_lightning_raise():
    """``RLModule.setup`` silences two warnings its design sets off on purpose. The filters are set at setup, so
    they hold after a caller resets the warning filters (a test harness, a notebook); each must match the real
    message (torch's scheduler before any optimiser step; Lightning's post-step checkpoint notice)."""
    import warnings

    from lightning.pytorch.utilities import rank_zero_warn

    from lightning_modules.rl import _quiet_expected_warnings

    def raised(silence: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            if silence:
                _quiet_expected_warnings()
            weight = torch.nn.Parameter(torch.zeros(1))
            scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([weight], lr=0.1), lambda step: 1.0)
            scheduler.step()  # a rollout with no update: the schedule steps, the optimiser does not
            rank_zero_warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was saved.")
        return [str(w.message) for w in caught]

    loud = raised(silence=False)
    assert any("lr_scheduler.step()" in m for m in loud) and any("ModelCheckpoint" in m for m in loud)
    assert raised(silence=True) == []
