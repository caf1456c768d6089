"""Stage 2 is the method it is named after: mini-batched PPO steps whose clips act, ε(τ) against a fixed ε,
the loss aggregations, DAPO's dynamic sampling and overlong shaping, strict reward parsing, and the
settings that would make the update wrong."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from eagrl.errors import EAGRLInputError
from eagrl.llm.generation import SamplingOptions, sample_groups
from eagrl.llm.parsing import FeatureMatcher, parse_answer, parse_probability
from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
from eagrl.optim import lr_factor
from eagrl.rl.grpo import Rollout, aggregation_weights, clipped_surrogate, group_advantages
from eagrl.rl.rewards import attention_alignment, overlong_penalty
from eagrl.rl.rollout import key_token_mask, token_ends
from eagrl.rl.step import UpdateConfig, mini_batches, optimise
from tests.conftest import REPO


# ------------------------------------------------------------------------------------ the clip itself
def _token_gradients(ratios: list[float], advantage: float, eps_high: float = 0.2, eps_low: float = 0.2) -> torch.Tensor:
    logp = torch.zeros(len(ratios), dtype=torch.float64, requires_grad=True)
    old = -torch.log(torch.tensor(ratios, dtype=torch.float64))  # r = exp(logp - old) = the given ratios
    n = len(ratios)
    loss, _ = clipped_surrogate(logp, old, torch.full((n,), advantage, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64), eps_low, eps_high)
    loss.backward()
    return logp.grad


def test_a_positive_advantage_token_above_one_plus_eps_high_gets_no_gradient():
    grad = _token_gradients([1.5, 1.1], advantage=1.0)
    assert grad[0] == 0 and grad[1] != 0


def test_a_negative_advantage_token_below_one_minus_eps_low_gets_no_gradient():
    grad = _token_gradients([0.7, 1.5], advantage=-1.0)
    assert grad[0] == 0 and grad[1] != 0  # above 1 + ε_high with A < 0: still learnt from


def test_a_wider_eps_high_lets_the_token_learn():
    assert _token_gradients([1.3], advantage=1.0, eps_high=0.2)[0] == 0
    assert _token_gradients([1.3], advantage=1.0, eps_high=0.4)[0] != 0


# ------------------------------------------------------------------------------------- a fixed rollout
@pytest.fixture(scope="module")
def fixed():
    """A tiny LoRA policy and one rollout of 8 completions of one prompt with fixed non-zero advantages."""
    torch.manual_seed(0)
    model, tokenizer = load_backbone(BackboneOptions(name="tiny-random-llama", lora=LoraOptions(rank=8, alpha=16, dropout=0.0)))
    prompt_ids = tokenizer("The patient is stable. Answer:", add_special_tokens=False)["input_ids"]
    sampling = SamplingOptions(max_new_tokens=6, min_new_tokens=6, do_sample=True)
    completions = [g.tokens[: 3 + k % 4] for k, g in enumerate(sample_groups(model, tokenizer, ["The patient is stable. Answer:"], 8, sampling, 8)[0])]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    advantages = group_advantages(rewards.view(1, 8)).flatten()
    keys = [[k % 2 == 0 for k in range(len(c))] for c in completions]
    rollout = Rollout([prompt_ids], completions, [""] * 8, rewards, rewards, rewards, torch.ones(8, dtype=torch.bool), advantages, keys, 8)
    return model, rollout


def _train(model, rollout, lr: float = 0.2, **config) -> tuple[torch.nn.Module, dict[str, float]]:
    model = copy.deepcopy(model)
    torch.manual_seed(1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    settings = {"backend": "torch", "mini_batch_size": 2, "eps_min": 0.2, "eps_max": 0.4, "eps_high": 0.2, **config}
    stats = optimise(model, optimizer, rollout, UpdateConfig(**settings))
    return model, stats


def _lora(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])


def test_mini_batches_are_counted_in_completions():
    assert mini_batches(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert mini_batches(6, None) == [[0, 1, 2, 3, 4, 5]]
    # 2 ranks, 2 prompts x G = 2 each: rank 1's prompts are the global prompts 1 and 3
    assert mini_batches(4, 4, group=2, rank=0, world=2) == [[0, 1], [2, 3]]
    assert mini_batches(4, 4, group=2, rank=1, world=2) == [[0, 1], [2, 3]]
    assert mini_batches(4, 3, group=2, rank=1, world=2) == [[0], [1], [2, 3]]  # global completions 2 | 3 | 6, 7


def test_one_step_per_rollout_leaves_every_ratio_at_one(fixed):
    _, stats = _train(*fixed, mini_batch_size=None)
    assert stats["steps"] == 1 and stats["ratio"] == pytest.approx(1.0, abs=1e-6) and stats["clip_high"] == 0.0


def test_eps_tau_and_a_fixed_eps_end_in_different_weights(fixed):
    adaptive, stats = _train(*fixed, adaptive_clip=True)
    constant, _ = _train(*fixed, adaptive_clip=False)
    assert stats["steps"] == 4 and stats["eps_high_max"] > stats["eps_high_min"]
    assert not torch.allclose(_lora(adaptive), _lora(constant))


def test_a_fixed_eps_clips_high_and_eps_tau_clips_less(fixed):
    _, constant = _train(*fixed, adaptive_clip=False)
    _, adaptive = _train(*fixed, adaptive_clip=True)
    assert constant["ratio"] != pytest.approx(1.0)  # the later mini-batches see a moved policy
    assert constant["clip_high"] > 0
    assert adaptive["clip_high"] < constant["clip_high"]


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_each_loss_aggregation_changes_the_update(fixed, mode):
    token_mean, _ = _train(*fixed, loss_agg="token_mean")
    other, _ = _train(*fixed, loss_agg=mode)
    assert not torch.allclose(_lora(token_mean), _lora(other))


def test_aggregation_weights():
    lengths = torch.tensor([2, 4])
    token = aggregation_weights(lengths, "token_mean", tokens=6, sequences=2, max_length=8)
    assert torch.allclose(token, torch.full((6,), 1 / 6))
    seq = aggregation_weights(lengths, "seq_mean_token_mean", tokens=6, sequences=2, max_length=8)
    assert torch.allclose(seq, torch.tensor([1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8]))  # each completion weighs 1/2
    dr = aggregation_weights(lengths, "seq_mean_token_sum_norm", tokens=6, sequences=2, max_length=8)
    assert torch.allclose(dr, torch.full((6,), 1 / 16))


# ------------------------------------------------------------------------------------------ configs
def _merged(*files: str) -> dict:
    out: dict = {"model": {}, "data": {}}
    for name in files:
        config = yaml.safe_load((REPO / name).read_text())
        for part in ("model", "data"):
            out[part].update((config.get(part) or {}).get("init_args") or {})
    return out


RL_CONFIGS = [
    ("configs/tjh/rl.yaml",), ("configs/mimic_iv/rl.yaml",), ("configs/tjh/rl_paper.yaml",), ("configs/mimic_iv/rl_paper.yaml",),
    ("configs/tjh/rl.yaml", "configs/reproduce/rl.yaml"), ("configs/mimic_iv/rl.yaml", "configs/reproduce/rl.yaml"),
    ("configs/tjh/rl.yaml", "configs/smoke/rl.yaml"), ("configs/tjh/rl.yaml", "configs/reproduce/rl.yaml", "configs/smoke/rl.yaml"),
]  # fmt: skip


@pytest.mark.parametrize("files", RL_CONFIGS, ids=lambda f: "+".join(Path(x).stem for x in f))
def test_every_shipped_rl_config_takes_at_least_two_steps_per_rollout(files):
    config = _merged(*files)
    completions = config["data"]["batch_size"] * config["model"]["group_size"]
    size = config["model"].get("mini_batch_size") or completions
    assert math.ceil(completions / size) >= 2, f"{files}: {completions} completions in mini-batches of {size}"


@pytest.mark.parametrize("profile", ["reproduce", "reproduce/quick"])
def test_every_llm_method_of_a_profile_answers_within_the_same_budget(profile, tokenizer):
    """Prompting, SFT and RL answer the test patients with the same number of new tokens and RL samples its rollouts
    with it; in PROFILE=cpu it has room for the longest path stage 1 can write (an SFT target): a smaller budget would
    cut a model that learnt the paths off before its <Final Answer>."""
    from eagrl.data.features import DATASET_FEATURES
    from eagrl.llm.generation import SamplingOptions
    from eagrl.mcts.policy import PolicySampling, longest_path

    budgets = {m: _merged(f"configs/tjh/{m}.yaml", f"configs/{profile}/{m}.yaml")["model"] for m in ("sft", "rl")}
    budgets["prompting"] = _merged("configs/tjh/prompting_decomposition.yaml", f"configs/{profile}/prompting.yaml")["model"]
    answers = {m: c["sampling"]["max_new_tokens"] for m, c in budgets.items()}
    assert len(set(answers.values())) == 1, answers
    assert budgets["rl"]["rollout_sampling"]["max_new_tokens"] == answers["rl"]
    if profile != "reproduce":  # PROFILE=quick, a first look at a few patients, keeps its earlier short answers
        return
    for dataset in ("tjh", "mimic_iv"):
        distill = _merged(f"configs/{dataset}/distill.yaml", f"configs/{profile}/distill.yaml")["model"]
        sampling = PolicySampling(**{k: SamplingOptions(max_new_tokens=v["max_new_tokens"]) for k, v in distill["sampling"].items()})
        names = [f.name for f in DATASET_FEATURES[dataset]] if distill.get("constrain_features") else None
        longest = longest_path(tokenizer, sampling, distill["search"]["max_depth"], names, distill.get("max_features", 5))
        assert answers["rl"] >= longest + 1, (dataset, answers, longest)  # + the end-of-turn token


def test_longest_path_bounds_what_the_search_writes(tokenizer):
    from eagrl.llm.generation import SamplingOptions
    from eagrl.mcts.policy import PolicySampling, longest_path

    short = PolicySampling(*(SamplingOptions(max_new_tokens=n) for n in (4, 4, 6)))
    assert longest_path(tokenizer, short, 3) - longest_path(tokenizer, short, 2) >= 8  # one more pair of steps
    names = ["Lactate", "Creatinine", "Hypersensitive cardiac troponin I"]
    assert longest_path(tokenizer, short, 2, names, 3) > longest_path(tokenizer, short, 2, names, 1) > longest_path(tokenizer, short, 2)


def test_longest_path_is_not_exceeded_by_paths_the_policy_writes(tokenizer, tiny):
    """The tiny random model made to write every step to its limit (end-of-text suppressed): the path's text, as stage 1
    stores it, stays within the bound."""
    from eagrl.llm.generation import SamplingOptions
    from eagrl.mcts.policy import LLMPolicy, PolicySampling, longest_path
    from eagrl.mcts.search import Trajectory

    full = PolicySampling(*(SamplingOptions(max_new_tokens=n, min_new_tokens=n, do_sample=True) for n in (6, 8, 10)))
    names = ["Lactate", "Creatinine", "Hypersensitive cardiac troponin I", "Albumin"]
    policy = LLMPolicy(tiny, tokenizer, full, batch_size=4, feature_names=names, max_features=3)
    torch.manual_seed(0)
    prompts = ["<|im_start|>user\nA patient.<|im_end|>\n<|im_start|>assistant\n"] * 2
    policy.begin(prompts)
    pairs = policy.propose_steps(prompts, [[], []], 2)
    finals = policy.propose_finals(prompts, [[pairs[0][0]], [pairs[1][1]]], 2)
    policy.end()
    bound = longest_path(tokenizer, full, 2, names, 3)
    for first, ends in zip((pairs[0][0], pairs[1][1]), finals):
        for final in ends:
            text = Trajectory(steps=[first, final], y_hat=None, features=[], r_cls=0.0, r_att=0.0, reward=0.0, depth=2).text
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= bound, text


def test_the_baseline_overlays_are_the_methods_they_are_named_after():
    grpo, dapo = _merged("configs/rl/grpo.yaml")["model"], _merged("configs/rl/dapo.yaml")["model"]
    assert grpo["loss_agg"] == "seq_mean_token_mean" and grpo["eps_high"] == grpo["eps_low"] == 0.2 and not grpo["adaptive_clip"]
    assert grpo["reward"] == {"use_attention": False} and not grpo["dynamic_sampling"]
    assert dapo["loss_agg"] == "token_mean" and dapo["eps_high"] == 0.28 and dapo["dynamic_sampling"] and dapo["overlong_shaping"]


# ------------------------------------------------------------------------------------------- rewards
def test_overlong_penalty():
    out = overlong_penalty([10, 13, 15, 16, 16], [True, True, True, True, False], max_length=16, buffer=4)
    assert out.tolist() == [0.0, -0.25, -0.75, -1.0, -1.0]


def test_strict_parsing_reads_only_the_final_answer():
    assert parse_probability("Heart rate is rising. HR 88", anywhere=True) == 0.88  # the older evaluation reading
    assert parse_probability("Heart rate is rising. HR 88") is None  # evaluation's reading: no tag, no ŷ
    assert parse_probability("Heart rate is rising. HR 88", strict=True) is None  # a truncated completion
    assert parse_probability("<Final Answer> 73", strict=True) is None and parse_probability("<Final Answer> 1.5", strict=True) is None
    assert parse_probability("<Final Answer> 73%", strict=True) == 0.73
    assert parse_probability("<Final Answer> 0.4", strict=True) == 0.4
    assert parse_probability("<Final Answer> yes", strict=True) is None
    assert parse_probability("<Final Answer> 1. The patient had 1 visit", strict=True) is None  # no reward for a list number
    assert parse_probability("<Final Answer> 1. Yes", strict=True) is None and parse_probability("<Final Answer> 1. 0.3", strict=True) == 0.3
    parsed = parse_answer("<Important Features> Heart rate, Unicorn count\n<Final Answer> 73", FeatureMatcher(["Heart rate"]))
    assert parsed.probability == 0.73 and parsed.strict_probability is None and parsed.unknown_features == 1


def test_made_up_features_lower_r_att():
    plain = attention_alignment([["a", "b"]], [["a", "c"]])
    padded = attention_alignment([["a", "b"]], [["a", "c"]], unknown=[2])
    assert float(plain[0]) == pytest.approx(1 / 3) and float(padded[0]) == pytest.approx(1 / 5)


# ---------------------------------------------------------------------------------------- the module
def _module(**overrides):
    from eagrl.rl.rewards import RewardConfig
    from lightning_modules.rl import RLModule

    kwargs = {"backbone": BackboneOptions(name="tiny-random-llama", lora=LoraOptions(dropout=0.0)), "reward": RewardConfig(use_attention=False)}
    kwargs.update(overrides)
    return RLModule(**kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eps_low": 0.0}, "eps_low must be within"),
        ({"eps_min": 0.0}, "must be > 0"),
        ({"eps_high": 0.0}, "must be > 0"),
        ({"rollout_sampling": SamplingOptions(do_sample=True, top_p=0.9)}, "rollout_sampling.top_p: RL rollouts must sample from the policy"),
        ({"rollout_sampling": SamplingOptions(do_sample=True, top_k=5)}, "rollout_sampling.top_k"),
        ({"rollout_sampling": SamplingOptions(do_sample=True, repetition_penalty=1.2)}, "repetition_penalty"),
        ({"backbone": BackboneOptions(name="tiny-random-llama", lora=LoraOptions(dropout=0.1))}, "lora.dropout must be 0 in RL"),
    ],
)
def test_settings_that_would_make_the_update_wrong_are_refused(overrides, message):
    with pytest.raises(EAGRLInputError, match=message):
        _module(**overrides)


def test_dynamic_sampling_refills_the_batch(monkeypatch):
    """Group 0 of the batch has equal rewards: it is dropped and a new train patient is sampled in its place."""
    module = _module(group_size=2, dynamic_sampling=True, resample_rounds=3)
    class Data(SimpleNamespace):
        def __len__(self) -> int:
            return len(self.ids)

    data = Data(labels=torch.tensor([0, 1, 0, 1, 0, 1]).numpy(), ids=[f"p{i}" for i in range(6)])
    datamodule = SimpleNamespace(datasets={"train": data}, hparams=SimpleNamespace(train_patients=None))
    module._trainer = SimpleNamespace(datamodule=datamodule, global_step=0, global_rank=0, world_size=1)
    calls = []

    def fake_rollout(data, positions, ids, labels):
        calls.append(list(positions))
        rewards = torch.tensor([[1.0, 0.0] if p % 3 else [0.5, 0.5] for p in positions]).flatten()  # patients 0, 3: equal rewards
        n = len(positions) * 2
        return Rollout([[p] for p in positions], [[1]] * n, [""] * n, rewards, rewards, rewards, torch.ones(n, dtype=torch.bool), rewards, [[False]] * n, 2)

    monkeypatch.setattr(module, "_rollout", fake_rollout)
    batch = {"split": ["train", "train"], "index": torch.tensor([0, 1]), "id": ["p0", "p1"], "label": torch.tensor([0, 1])}
    first = fake_rollout(data, [0, 1], ["p0", "p1"], [0, 1])
    kept, rounds = module.refill(first, batch)
    assert len(kept.prompt_ids) == 2 and rounds >= 1 and [0] not in kept.prompt_ids
    assert all(p not in (0, 1) for extra in calls[1:] for p in extra)  # never a patient already tried
    assert module._refill_tokens == sum(2 * len(extra) for extra in calls[1:])  # resampled tokens count against the budget


@pytest.mark.parametrize("dynamic", [False, True])
def test_training_step_logs_the_share_of_groups_with_varied_rewards(monkeypatch, dynamic):
    """train/groups_varied: of the rollout's first-round groups, the share whose G rewards are not all equal (the
    groups with a non-zero advantage), for GRPO-like variants and for DAPO (before its refill) alike."""
    import lightning_modules.rl as rl

    module = _module(group_size=2, dynamic_sampling=dynamic, resample_rounds=0)
    rewards = torch.tensor([0.5, 0.5, 1.0, 0.0, -1.0, -1.0, 0.2, 0.3])  # groups 0 and 2 flat, 1 and 3 varied
    flags = torch.ones(8, dtype=torch.bool)
    rollout = Rollout([[1]] * 4, [[1]] * 8, [""] * 8, rewards, rewards, rewards, flags, group_advantages(rewards.view(4, 2)).flatten(), [[False]] * 8, 2)
    monkeypatch.setattr(module, "rollout", lambda batch: rollout)
    monkeypatch.setattr(module, "refill", lambda r, batch: (r.select_groups(torch.tensor([False, True, False, True])), 0))
    monkeypatch.setattr(rl, "optimise", lambda *args, **kwargs: {})
    for name in ("update_config", "_loss", "_linear_loss"):  # made by configure_model; the update itself is not under test
        monkeypatch.setattr(module, name, None, raising=False)
    monkeypatch.setattr(module, "optimizers", lambda: SimpleNamespace(param_groups=[{"lr": 1.0}]))
    monkeypatch.setattr(module, "lr_schedulers", lambda: SimpleNamespace(step=lambda: None))
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.update(values))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(), should_stop=False)
    module.training_step({"id": ["a", "b", "c", "d"]}, 0)
    assert logged["train/groups_varied"] == pytest.approx(0.5)
    assert logged["train/reward"] == pytest.approx(float(rewards.mean()))  # the first-round rollout's mean


def test_init_adapter_is_merged_so_the_kl_reference_is_the_stage1_policy(tmp_path):
    from peft import get_peft_model, LoraConfig

    torch.manual_seed(0)
    base, tokenizer = load_backbone(BackboneOptions(name="tiny-random-llama"))
    stage1 = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    stage1.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("A short prompt", add_special_tokens=False)["input_ids"]])
    stage1.eval()
    with torch.no_grad():
        expected = stage1(input_ids=ids).logits
        with stage1.disable_adapter():
            plain = stage1(input_ids=ids).logits
    module = _module(init_adapter=str(tmp_path / "adapter"))
    module.configure_model()
    module.llm.eval()
    with torch.no_grad(), module.llm.disable_adapter():
        reference = module.llm(input_ids=ids).logits
    assert torch.allclose(reference, expected, atol=1e-5) and not torch.allclose(reference, plain, atol=1e-3)
    assert all(m.p == 0 for n, m in module.llm.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" in n)


# --------------------------------------------------------------------------------------- small parts
def test_key_token_mask_is_linear_in_the_completion(monkeypatch):
    _, tokenizer = load_backbone(BackboneOptions(name="tiny-random-llama"))
    text = "<Subquestion> why?\n<Answer> rising.\n" * 20 + "<Important Features> D-D dimer, LDH\n<Final Answer> 0.8"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    quadratic = [len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) for k in range(len(tokens))]
    assert token_ends(tokenizer, tokens) == quadratic
    decoded_tokens = []
    original = type(tokenizer).decode

    def counting(self, ids, *args, **kwargs):
        decoded_tokens.append(len(ids))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "decode", counting)
    mask = key_token_mask(tokenizer, tokens)
    assert sum(decoded_tokens) <= 8 * len(tokens)  # one decode per prefix would read ~N²/2 = 10^4+ tokens
    assert any(mask) and not all(mask)


def test_token_ids_outside_the_vocabulary_are_refused():
    from eagrl.kernels import token_logp_entropy

    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 8\)"):
        token_logp_entropy(torch.zeros(2, 8), torch.tensor([1, 8]), backend="torch")


def test_learning_rate_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 10, 2, "cosine") for s in (2, 6, 10)]
    assert cosine[0] == 1.0 and cosine[1] == pytest.approx(0.5) and cosine[2] == pytest.approx(0.0, abs=1e-12)


def test_overlong_shaping_changes_the_rollout_rewards(monkeypatch):
    from eagrl.llm.generation import Generation

    def rewards(shaping: bool) -> list[float]:
        module = _module(group_size=2, overlong_shaping=shaping, rollout_sampling=SamplingOptions(max_new_tokens=8, do_sample=True))
        module.configure_model()
        module.matcher, module.expert = FeatureMatcher(["Heart rate"]), None
        module.fit_prompt = lambda data, i: ("The patient. Answer:", 4, 1)
        cut = Generation("<Final Answer> 0.9", 4, 8, False, [5] * 8)  # cut at L = 8 without ending
        short = Generation("<Final Answer> 0.9", 4, 2, True, [5, 6])
        monkeypatch.setattr("lightning_modules.rl.sample_groups", lambda *a, **k: [[cut, short]])
        return module._rollout(None, [0], ["p0"], [1]).rewards.tolist()

    plain, shaped = rewards(False), rewards(True)
    assert plain[0] == plain[1] and shaped[0] == pytest.approx(plain[0] - 1.0) and shaped[1] == plain[1]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_rl_learning_rate_schedule_is_applied(schedule):
    module = _module(lr=1.0, lr_schedule=schedule, warmup_steps=0)
    module.configure_model()
    module._trainer = SimpleNamespace(estimated_stepping_batches=4)
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(3):
        rates.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    assert rates == ([1.0, 1.0, 1.0] if schedule == "constant" else pytest.approx([1.0, lr_factor(1, 4, 0, "cosine"), 0.5]))


def test_logp_mismatch_is_the_mean_gap_between_sampler_and_training_logprobs(fixed):
    model, rollout = fixed
    _, stats = _train(model, rollout)
    assert math.isnan(stats["logp_mismatch"])  # no sampler log-probs kept
    old = [[-1.0] * len(c) for c in rollout.completions]
    _, exact = _train(model, dataclasses.replace(rollout, sampler_logp=old))
    from eagrl.rl.step import score, _per_trajectory

    with torch.no_grad():
        train = _per_trajectory(rollout, [logp for logp, _ in score(model, rollout, UpdateConfig(backend="torch"))])
    gaps = torch.cat([(t.double() + 1.0).abs() for t in train])
    assert exact["logp_mismatch"] == pytest.approx(float(gaps.mean()), rel=1e-6)
    shifted = [(t + 0.1).tolist() for t in train]
    _, off = _train(model, dataclasses.replace(rollout, sampler_logp=shifted))
    assert off["logp_mismatch"] == pytest.approx(0.1, abs=1e-5)
