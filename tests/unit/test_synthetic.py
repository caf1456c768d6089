"""The synthetic cohort (``dataset: synthetic``): seeded, the real cohorts' schema, an outcome that follows its rule,
short prompts, and an expert that attends to the rule's variables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eagrl.data.features import SYNTHETIC_FEATURES
from eagrl.data.synthetic import LAB_NAMES, RULE_FEATURES, load_synthetic, rule_logit
from eagrl.errors import EAGRLInputError
from eagrl.evaluation.metrics import ranking
from tests.conftest import run_cli


def _auroc(score: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based: torchmetrics' binary_auroc squashes scores outside [0, 1] with a sigmoid, tying every lab value above ~17."""
    return ranking(torch.tensor(score, dtype=torch.float64), torch.tensor(labels).long())["auroc"]


def test_the_generator_is_seeded_and_has_the_cohort_schema():
    a, b, c = load_synthetic(200, seed=3), load_synthetic(200, seed=3), load_synthetic(200, seed=4)
    assert np.array_equal(a.values, b.values, equal_nan=True) and np.array_equal(a.labels["mortality"], b.labels["mortality"])
    assert not np.array_equal(a.values, c.values, equal_nan=True)
    assert a.features == SYNTHETIC_FEATURES and a.feature_names[:2] == ["Sex", "Age"] and len(LAB_NAMES) == 20
    visits = np.diff(a.offsets)
    assert visits.min() >= 2 and visits.max() <= 4 and a.values.shape == (visits.sum(), 22)
    last = a.values[a.offsets[1:] - 1]  # [N, F]
    rule = [a.feature_names.index(name) for name in RULE_FEATURES]
    assert not np.isnan(last[:, rule]).any()  # the rule is computable from what the text shows
    assert np.isnan(a.values[:, 2:]).mean() == pytest.approx(0.1, abs=0.03)  # the rest is sometimes unmeasured


def test_the_outcome_follows_the_rule_and_nothing_else():
    cohort = load_synthetic()
    labels = cohort.labels["mortality"]
    last = cohort.values[cohort.offsets[1:] - 1]  # [N, F]
    column = {name: last[:, cohort.feature_names.index(name)] for name in cohort.feature_names}
    assert 0.2 < labels.mean() < 0.45
    assert _auroc(rule_logit({name: column[name] for name in RULE_FEATURES}), labels) > 0.9
    for name in RULE_FEATURES:  # each rule variable alone is informative (albumin: low is bad)
        sign = -1.0 if name == "Albumin" else 1.0
        assert _auroc(sign * column[name], labels) > 0.6, name
    for name in set(LAB_NAMES) - set(RULE_FEATURES):  # the others are noise (NaN: a missing value ranks low)
        assert abs(_auroc(np.nan_to_num(column[name], nan=-1e9), labels) - 0.5) < 0.12, name


def test_the_datamodule_serves_it_with_short_text(tmp_path):
    from datamodules import EHRDataModule
    from eagrl.models.backbone import embedded_tokenizer

    dm = EHRDataModule(dataset="synthetic", cache_dir=str(tmp_path), text_style="compact", max_visits=1, progress=False)
    dm.setup()
    sizes = {split: len(dm.datasets[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 350, "val": 50, "test": 100}
    assert "synthetic_patients" in json.loads(next(tmp_path.glob("datasets/synthetic/*/manifest.json")).read_text())["options"]
    text = dm.datasets["test"].text(0)
    assert "Lactate" in text and "Albumin" in text
    tokenizer = embedded_tokenizer()
    lengths = [len(tokenizer(dm.datasets["test"].text(i))["input_ids"]) for i in range(40)]
    assert np.median(lengths) <= 200  # the patient's text; the decomposition prompt adds ~206 tokens of instructions
    with pytest.raises(EAGRLInputError, match="observation window"):
        EHRDataModule(dataset="synthetic", observation_days=2)
    small = EHRDataModule(dataset="synthetic", cache_dir=str(tmp_path), batch_size=2, eval_batch_size=8, progress=False)
    small.setup()
    assert len(next(iter(small.train_dataloader()))["id"]) == 2 and len(next(iter(small.test_dataloader()))["id"]) == 8


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory, session_cache) -> Path:
    """A runs root holding ``synthetic/concare``: the expert trained on the synthetic cohort (its real fit)."""
    runs = tmp_path_factory.mktemp("runs")
    result = run_cli("fit", "--config", "configs/tjh/concare.yaml", "--config", "configs/synthetic/cohort.yaml",
                     "--trainer.default_root_dir", str(runs / "synthetic" / "concare"), cache=session_cache)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return runs


@pytest.mark.slow
def test_concare_attends_to_the_rule_variables(synthetic_runs):
    """The expert trained on the synthetic cohort puts most of its attention on the rule's variables for the patients
    who die (for survivors nothing is abnormal in the rule, and its attention has no reason to go there)."""
    from eagrl.evaluation.report import synthetic_check

    assert json.loads((synthetic_runs / "synthetic" / "concare" / "metrics.json").read_text())["test/auroc"] > 0.85
    expert = synthetic_check(synthetic_runs)["expert"]
    assert expert["attention_on_rule_positives"] > 0.6


def _warm_start(folder: Path, cache: Path, steps: int = 300) -> Path:
    """The tiny random Llama, all its weights trained on the synthetic train patients' RL prompts (the decomposition
    prompt) with a fixed answer that names two lab variables drawn at random and answers 0.5: a policy that writes the
    strict format and names features without regard to the patient. (LoRA on the random tiny model cannot learn the
    format: its tied 64-wide embeddings bound every logit; README, synthetic cohort.) Saved as a model directory."""
    import random

    from datamodules import EHRDataModule
    from eagrl.llm.prompts import PromptFitter
    from eagrl.llm.sft import sft_batch
    from eagrl.models.backbone import embedded_tokenizer, tiny_random_llama
    from lightning_modules.sft import completion_loss

    torch.manual_seed(0)
    rng = random.Random(0)
    dm = EHRDataModule(dataset="synthetic", text_style="compact", max_visits=1, progress=False, cache_dir=str(cache))
    dm.setup()
    tokenizer = embedded_tokenizer()
    fit = PromptFitter(tokenizer, 1800, dm.dataset, dm.question, "decomposition", 2, True)
    prompts = [fit(dm.datasets["train"], i)[0] for i in range(len(dm.datasets["train"]))]
    model = tiny_random_llama(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):  # loss 10.8 -> ~0.33 (the two names' draw is what is left)
        chosen = [rng.randrange(len(prompts)) for _ in range(8)]
        answers = [f"<Important Features> {', '.join(rng.sample(LAB_NAMES, 2))}\n<Final Answer> 0.5" for _ in chosen]
        loss = completion_loss(model, sft_batch(tokenizer, [prompts[i] for i in chosen], answers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_eag_rl_on_the_synthetic_cohort_learns_to_name_the_experts_features(synthetic_runs, tmp_path, session_cache):
    """Stage 2 (the RL LightningModule, EAG-RL's reward and clip) with the real synthetic expert, from a tiny policy that
    names features at random: over 32 rollouts its training R_att rises by more than 2 standard errors (the last 5
    rollouts' mean against the first 5's, the report's ``reward_trend``).

    The issue asks this of the total reward. It is not asserted: in every setting measured (README, synthetic cohort)
    the total reward stayed within its noise while R_att rose, because an unparsed completion costs λ log 0.01 ≈ −2.8
    and the alignment term gains at most (1 − λ) ΔR_att ≈ 0.03, so the few percent of sampled completions that leave the format
    after some updates cancel it."""
    from eagrl.evaluation.report import _metrics_csv, reward_trend

    start = _warm_start(tmp_path / "start", session_cache)
    run = tmp_path / "rl"
    result = run_cli(
        "fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/synthetic/cohort.yaml", "--config", "configs/smoke/rl.yaml",
        "--model.init_args.backbone.name", str(start),
        "--model.init_args.backbone.lora.target_modules", "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "--model.init_args.expert_attention", str(synthetic_runs / "synthetic" / "concare" / "expert_attention.jsonl"),
        "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "16",
        "--data.init_args.train_patients", "64", "--data.init_args.batch_size", "4",  # 16 rollouts an epoch
        "--model.init_args.group_size", "8", "--model.init_args.rollout_batch_size", "32", "--model.init_args.mini_batch_size", "8",
        "--model.init_args.rollout_sampling.max_new_tokens", "24", "--model.init_args.rollout_sampling.temperature", "0.7",
        "--model.init_args.sampling.max_new_tokens", "24", "--model.init_args.lr", "0.003",
        cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics_csv(run)
    assert len(rows) == 32
    r_att = reward_trend([float(r["train/r_att"]) for r in rows])
    assert r_att["z"] > 2 and r_att["last"] > 1.5 * r_att["first"], r_att
