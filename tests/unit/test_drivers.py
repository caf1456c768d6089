"""``eagrl.evaluation.drivers``: which feature of the text a run's ŷ >= 0.5 follows, against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eagrl.data.features import SYNTHETIC_FEATURES, FeatureSpec
from eagrl.data.synthetic import load_synthetic
from eagrl.data.text import normal_bounds, shown_values
from eagrl.errors import EAGRLInputError
from eagrl.evaluation.drivers import DAY, answer_drivers, last_shown, main


def _pairwise_auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mann-Whitney by hand: the share of (positive, negative) pairs the score orders right, ties one half."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_answer_drivers_equal_a_pairwise_count_on_any_scale():
    rng = np.random.default_rng(0)
    n = 60
    follows = rng.normal(140, 5, size=n)  # a sodium-like scale: ŷ >= 0.5 exactly where it is above 140
    noise = rng.normal(size=n)
    sparse = np.full(n, np.nan)
    sparse[:10] = rng.normal(size=10)  # shown to 10 patients only: left out
    labels = (rng.random(n) < 0.4).astype(int)
    y_hat = [0.9 if v > 140 else 0.1 for v in follows]
    y_hat[3], y_hat[4] = None, float("nan")  # unanswered: left out of every AUROC
    shown = np.stack([noise, follows, sparse], axis=1)  # [N, 3]
    rows = answer_drivers(shown, ["noise", "follows", "sparse"], y_hat, labels, min_patients=20)
    assert [r["feature"] for r in rows] == ["follows", "noise"]  # sorted by |AUROC - 0.5|; sparse left out
    keep = np.ones(n, bool)
    keep[[3, 4]] = False
    likely = (follows > 140).astype(int)
    for row, j in zip(rows, [1, 0]):
        assert row["patients"] == n - 2
        assert row["auroc_yhat"] == pytest.approx(_pairwise_auroc(shown[keep, j], likely[keep]))
        assert row["auroc_outcome"] == pytest.approx(_pairwise_auroc(shown[keep, j], labels[keep]))
    assert rows[0]["auroc_yhat"] == pytest.approx(1.0)
    assert answer_drivers(shown, ["noise", "follows", "sparse"], [0.9] * n, labels) == []  # nothing to separate
    with pytest.raises(ValueError, match="shown must be"):
        answer_drivers(shown[:, :2], ["noise", "follows", "sparse"], y_hat, labels)


def test_shown_values_are_what_the_text_tells():
    features = (FeatureSpec("Sex", demographic=True), FeatureSpec("Age", demographic=True), *SYNTHETIC_FEATURES[2:5])
    names = [f.name for f in features]
    lactate, albumin = names.index("Lactate"), names.index("Albumin")
    values = np.full((2, len(features)), np.nan)  # [T, F]
    values[:, 0], values[:, 1] = 1.0, 70.0
    values[:, lactate] = [1.0, 1.5]  # normal at both measurements: written "normal"
    values[:, albumin] = [3.0, np.nan]  # low, measured at the first visit only
    paper, compact = shown_values(values, features, "paper"), shown_values(values, features, "compact")
    assert paper[lactate] == 1.5 and paper[albumin] == 3.0 and paper[1] == 70.0 and compact[1] == 70.0
    bounds = normal_bounds(features[lactate].normal_range)
    assert compact[lactate] == bounds.inside() and bounds.flag(compact[lactate]) == "" and compact[albumin] == 3.0
    assert np.isnan(paper[[j for j in range(len(names)) if j not in (0, 1, lactate, albumin)]]).all()
    # the shared "normal" value lies between the text's L and H values
    assert normal_bounds("< 14").inside() < 14 and normal_bounds("> 90").inside() > 90 and normal_bounds("60-100").inside() == 80


def test_last_shown_reads_only_the_visits_the_prompt_showed():
    raw = load_synthetic(200, seed=1)
    # a sample whose Sodium is missing at the last visit but measured at the one before (the rule's are never missing)
    j = raw.feature_names.index("Sodium")
    sample = next(i for i in range(raw.num_samples) if np.isnan(raw.values[raw.rows(i)][-1, j]) and not np.isnan(raw.values[raw.rows(i)][-2, j]))
    rows = raw.rows(sample)
    one, two = last_shown(raw, [str(raw.sample_ids[sample])] * 2, [1, 2])  # [F + 1] each
    assert np.isnan(one[j]) and two[j] == raw.values[rows][-2, j]
    assert one[-1] == two[-1] == raw.days[rows][-1]
    with pytest.raises(EAGRLInputError, match="record 1: its patient is not in the synthetic cohort"):
        last_shown(raw, ["no such patient"], [1])


def _fake_run(tmp_path, data: str, follow: str, cohort_seed: int = 3):
    """A run directory whose answers say 0.8 where ``follow``'s last value is above its median (synthetic cohort)."""
    raw = load_synthetic(80, seed=cohort_seed)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "config.yaml").write_text(f"data:\n  init_args:\n    dataset: synthetic\n    synthetic_patients: 80\n    synthetic_seed: 3\n{data}")
    shown = last_shown(raw, [str(s) for s in raw.sample_ids], [1] * raw.num_samples)
    j = raw.feature_names.index(follow)
    cut = np.nanmedian(shown[:, j])
    records = [
        {"id": str(s), "label": int(raw.labels["mortality"][i]), "y_hat": 0.8 if shown[i, j] > cut else 0.2, "visits_shown": 1}
        for i, s in enumerate(raw.sample_ids)
        if not np.isnan(shown[i, j])
    ]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, records


def test_the_command_reads_the_runs_cohort_and_finds_the_feature_the_answers_follow(tmp_path, capsys):
    """Answers that follow Sodium (values ~140: a sigmoid-squashing AUROC would tie them all) rank it first with an AUROC
    of 100, from the cohort the run's config names; no patient id is printed or written."""
    run, records = _fake_run(tmp_path, "", "Sodium")
    main([str(run), "--top", "3", "--json", str(tmp_path / "drivers.json")])
    printed = capsys.readouterr().out
    assert printed.splitlines()[3].startswith(f"| Sodium | {len(records)} | 100.0 |")
    found = json.loads((tmp_path / "drivers.json").read_text())
    assert found["patients"] == len(records) and found["features"][0]["feature"] == "Sodium"
    assert DAY in [row["feature"] for row in found["features"]]
    assert not any(r["id"] in printed or r["id"] in json.dumps(found) for r in records)
    # the feature subset of the config: only Sex, Age, the subset and the day are ranked
    run, _ = _fake_run(tmp_path, "    features: [Lactate]\n", "Lactate")
    main([str(run), "--min-patients", "10", "--json", str(tmp_path / "subset.json")])
    assert {row["feature"] for row in json.loads((tmp_path / "subset.json").read_text())["features"]} <= {"Sex", "Age", "Lactate", DAY}


def test_the_strict_reading_drops_bare_numbers_read_as_percentages(tmp_path, capsys):
    """``--reading strict`` reads ŷ again from each completion as the reward path does: an echoed "80" (an age, say)
    that the evaluation's reading took as 80% is no answer, so the answers that said it leave the ranking."""
    run, records = _fake_run(tmp_path, "", "Sodium")
    for r in records:
        r["completion"] = "<Final Answer> 80" if r["y_hat"] >= 0.5 else "<Final Answer> 0.2"
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main([str(run), "--json", str(tmp_path / "saved.json")])
    main([str(run), "--reading", "strict", "--json", str(tmp_path / "strict.json")])
    saved, strict = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("saved", "strict"))
    likely = sum(r["y_hat"] >= 0.5 for r in records)
    assert (saved["answered"], saved["likely"], saved["features"][0]["feature"]) == (len(records), likely, "Sodium")
    assert (strict["answered"], strict["likely"], strict["features"], strict["reading"]) == (len(records) - likely, 0, [], "strict")
    assert "nothing to rank: every answer is on one side of 0.5" in capsys.readouterr().out


def test_the_command_refuses_another_cohort_and_bad_input(tmp_path):
    run, _ = _fake_run(tmp_path, "", "Sodium", cohort_seed=4)  # answers of another cohort than the config's
    with pytest.raises(SystemExit, match="answers carry another label than the cohort read from config.yaml"):
        main([str(run)])
    (run / "config.yaml").write_text("data:\n  init_args:\n    dataset: meds\n")
    with pytest.raises(SystemExit, match="expected tjh, synthetic or mimic_iv"):
        main([str(run)])
    (run / "generations.jsonl").write_text('{"id": "a", "label": 1}\n')
    with pytest.raises(SystemExit, match="line 1: expected a JSON object with 'id', 'label', 'y_hat', 'visits_shown'"):
        main([str(run)])
