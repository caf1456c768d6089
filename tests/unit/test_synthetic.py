"""The synthetic cohort (``dataset: synthetic``): seeded, the real cohorts' schema, an outcome that follows its rule,
short prompts, and an expert that attends to the rule's variables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eagrl.data.features import SYNTHETIC_FEATURES
from eagrl.data.synthetic import LAB_NAMES, RULE_FEATURES, load_synthetic, rule_logit
from eagrl.errors import EAGRLInputError
from eagrl.evaluation.metrics import ranking
from tests.conftest import REPO, run_cli


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
def synthetic_expert(tmp_path_factory, session_cache) -> Path:
    """A runs root holding ``synthetic/concare``: the expert, really trained on the synthetic cohort."""
    runs = tmp_path_factory.mktemp("runs")
    result = run_cli("fit", "--config", "configs/tjh/concare.yaml", "--config", "configs/synthetic/cohort.yaml",
                     "--trainer.default_root_dir", str(runs / "synthetic" / "concare"), cache=session_cache)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return runs


@pytest.mark.slow
def test_concare_attends_to_the_rule_variables(synthetic_expert):
    """The expert trained on the synthetic cohort puts most of its attention on the rule's variables for the patients
    who die (for survivors nothing is abnormal in the rule, and its attention has no reason to go there)."""
    from eagrl.evaluation.report import synthetic_check

    assert json.loads((synthetic_expert / "synthetic" / "concare" / "metrics.json").read_text())["test/auroc"] > 0.85
    expert = synthetic_check(synthetic_expert)["expert"]
    assert expert["attention_on_rule_positives"] > 0.6


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 3.0 min in the clean-clone run, 6-8 min with another run sharing the 2 cores: warm start, 24 rollouts
def test_rl_on_the_synthetic_cohort_raises_the_reward(synthetic_expert, tmp_path, session_cache):
    """Stage 2 raises the reward: EAG-RL (the RL LightningModule through the CLI, its reward with the real synthetic
    expert, its clip and ε(τ)) from a tiny policy that writes the strict format and names two lab variables at random.
    The last 5 rollouts' mean training reward exceeds the first 5's by more than 2 standard errors (the report's
    ``reward_trend``), and R_att, the only term that differs between its parsed completions, rises with it.

    The policy is the tiny random Llama with all its weights first trained on the format (``benchmarks/warm_start_rl.py``,
    whose default settings these are; SmolLM2 is too slow for a test, and LoRA alone cannot teach the random model the
    format). It answers 0.5 for every patient, so what RL can gain here is the alignment term: naming what the expert
    ranks, respiratory rate above all (in its top 5 for all but one patient). What makes the trend clear of its noise
    (README, synthetic cohort): 16 patients x G = 8 a rollout, sampled at temperature 0.3, lr 1e-3 falling to 0 (cosine),
    a KL penalty of 0.1 to the warm start. Each completion that leaves the format scores λ log 0.01 ≈ −2.8 against
    ≈ −0.38: with 4 patients a rollout one of them among the last 5 rollouts lowers its rollout by 0.075 and widens the
    standard error enough to take z below 2, and without the KL term one run's policy drifted into listing respiratory
    rate until the 24-token limit cut the answer."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from warm_start_rl import rl_arguments, trends, warm_start

    start = warm_start(tmp_path / "start", cache_dir=session_cache)
    expert = synthetic_expert / "synthetic" / "concare" / "expert_attention.jsonl"
    # the loss's PyTorch path: interpreted over the 49k vocabulary the Triton kernels take minutes a rollout
    result = run_cli(*rl_arguments(start, expert, tmp_path / "rl"), cache=session_cache, env={"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = trends(tmp_path / "rl")
    assert found["rollouts"] == 24
    assert found["reward"]["z"] > 2 and found["reward"]["difference"] > 0, found
    assert found["r_att"]["difference"] > 0, found
