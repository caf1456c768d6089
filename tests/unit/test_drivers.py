"""``eagrl.evaluation.drivers``: which shown feature a run's ŷ >= 0.5 follows, against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from eagrl.data.synthetic import load_synthetic
from eagrl.errors import EAGRLInputError
from eagrl.evaluation.drivers import DAY, answer_drivers, last_shown, main


def test_answer_drivers_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    n = 60
    follows = rng.normal(size=n)  # ŷ >= 0.5 exactly where it is positive
    noise = rng.normal(size=n)
    sparse = np.full(n, np.nan)
    sparse[:10] = rng.normal(size=10)  # shown for 10 patients only: left out
    labels = (rng.random(n) < 0.4).astype(int)
    y_hat = [0.9 if v > 0 else 0.1 for v in follows]
    y_hat[3] = None  # unanswered: left out of every AUROC
    shown = np.stack([noise, follows, sparse], axis=1)  # [N, 3]
    rows = answer_drivers(shown, ["noise", "follows", "sparse"], y_hat, labels, min_patients=20)
    assert [r["feature"] for r in rows] == ["follows", "noise"]  # sorted by |AUROC - 0.5|; sparse left out
    keep = np.array([y is not None for y in y_hat])
    likely = torch.tensor([y is not None and y >= 0.5 for y in y_hat])[keep].long()
    for row, j in zip(rows, [1, 0]):
        values = torch.tensor(shown[keep, j])
        assert row["patients"] == n - 1
        assert row["auroc_yhat"] == pytest.approx(float(binary_auroc(values, likely)))
        assert row["auroc_outcome"] == pytest.approx(float(binary_auroc(values, torch.tensor(labels)[keep])))
    assert rows[0]["auroc_yhat"] == pytest.approx(1.0)
    # every answer on one side of 0.5: nothing to separate
    assert answer_drivers(shown, ["noise", "follows", "sparse"], [0.9] * n, labels) == []
    with pytest.raises(ValueError, match="shown must be"):
        answer_drivers(shown[:, :2], ["noise", "follows", "sparse"], y_hat, labels)


def test_last_shown_reads_the_visits_the_prompt_showed():
    raw = load_synthetic(6, seed=1)
    ids = [str(s) for s in raw.sample_ids[:2]]
    out = last_shown(raw, ids, [1, 2])  # [2, F + 1]
    for n, k in enumerate([1, 2]):
        rows = raw.rows(n)
        values = raw.values[rows][-k:]
        for j in range(values.shape[1]):
            seen = values[~np.isnan(values[:, j]), j]
            assert (np.isnan(out[n, j]) and not len(seen)) or out[n, j] == seen[-1]
        assert out[n, -1] == raw.days[rows][-1]
    with pytest.raises(EAGRLInputError, match="sample 1 is not in the synthetic cohort"):
        last_shown(raw, ["no such patient"], [1])


def test_the_command_reads_the_runs_cohort_and_names_the_rule_feature(tmp_path, capsys):
    """A fake run whose answers follow the synthetic rule's Lactate: the command reads the cohort its config names
    and ranks Lactate first, with an AUROC of 1 for ŷ >= 0.5."""
    raw = load_synthetic(80, seed=3)
    lactate = raw.feature_names.index("Lactate")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  init_args:\n    dataset: synthetic\n    synthetic_patients: 80\n    synthetic_seed: 3\n")
    shown = last_shown(raw, [str(s) for s in raw.sample_ids], [1] * raw.num_samples)
    cut = np.nanmedian(shown[:, lactate])
    records = [
        {"id": str(s), "label": int(raw.labels["mortality"][i]), "y_hat": 0.8 if shown[i, lactate] > cut else 0.2, "visits_shown": 1}
        for i, s in enumerate(raw.sample_ids)
        if not np.isnan(shown[i, lactate])
    ]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    main([str(run), "--top", "3", "--json", str(tmp_path / "drivers.json")])
    printed = capsys.readouterr().out
    assert "| Lactate |" in printed.splitlines()[3] and "| 100.0 |" in printed.splitlines()[3]
    found = json.loads((tmp_path / "drivers.json").read_text())
    assert found["patients"] == len(records) and found["features"][0]["feature"] == "Lactate"
    assert DAY in [row["feature"] for row in found["features"]]
    (run / "config.yaml").write_text("data:\n  init_args:\n    dataset: meds\n")
    with pytest.raises(EAGRLInputError, match="expected tjh, synthetic or mimic_iv"):
        main([str(run)])
