"""The results report reads every number from the run directories: every row and column present, each
figure equal to its run's metrics.json, missing runs shown as not run, plots written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from eagrl.evaluation.metrics import paired_difference
from eagrl.evaluation.report import ABLATIONS, COLUMNS, CROSS, MAIN, PAIRED_RESAMPLES, PAIRS, ROBUST_METHODS, SHUFFLED, build, predictions


def _run(folder: Path, seed: int, with_predictions: bool = True) -> dict:
    rng = random.Random(seed)
    metrics = {"test/auroc": rng.uniform(0.5, 1), "test/auroc_std": rng.uniform(0, 0.1), "test/auprc": rng.uniform(0.3, 1),
               "test/auprc_std": rng.uniform(0, 0.1), "test/samples": 8.0, "test/strict_parse_rate": rng.random(),
               "test/r_att": rng.random()}  # fmt: skip
    metrics["test/auroc_ci_low"], metrics["test/auroc_ci_high"] = metrics["test/auroc"] - 0.1, min(metrics["test/auroc"] + 0.05, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if with_predictions:
        rows = [{"id": f"s{k}", "split": "test", "label": k % 2, "y_hat": rng.random()} for k in range(8)]
        (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs = folder / "logs/version_0"
        logs.mkdir(parents=True)
        lines = ["epoch,step,train/reward,train/entropy,train/clip_high,train/clip_low"] + [f"0,{s},{rng.random()},{rng.random()},0.1,0.0" for s in range(3)]
        (logs / "metrics.csv").write_text("\n".join(lines) + "\n")
    return metrics


def test_report_has_every_cell_and_reads_each_from_its_run(tmp_path):
    runs, expected = tmp_path / "runs", {}
    seed = 0
    for row, name in MAIN:
        for key, _, folder, suffix in COLUMNS:
            if (row, key) == ("DAPO", "mimic_iv_readmission"):
                continue  # one run missing: shown as not run
            if (name, key) == ("concare_window", "mimic_iv_readmission"):
                continue  # readmission is predicted from the whole stay: no window run
            seed += 1
            expected[(row, key)] = _run(runs / folder / f"{name}{suffix}", seed)
    for _, name in ABLATIONS + ROBUST_METHODS:
        for p in SHUFFLED[1:]:
            _run(runs / "tjh" / f"robust/{name}_{p}", seed := seed + 1, with_predictions=False)
    _run(runs / "tjh" / "rl_no_att", seed + 1, with_predictions=False)
    for _, name in CROSS:
        _run(runs / "cross" / name, seed := seed + 1, with_predictions=False)

    results = build(runs, tmp_path / "results")
    for (row, key), metrics in expected.items():
        cell = results["main"][row][key]
        assert cell["auroc"] == metrics["test/auroc"] and cell["auprc_std"] == metrics["test/auprc_std"]
    assert results["main"]["DAPO"]["mimic_iv_readmission"] is None
    text = (tmp_path / "results" / "results.md").read_text()
    for row, _ in MAIN + ABLATIONS + ROBUST_METHODS:
        assert f"| {row} |" in text
    for _, title, _, _ in COLUMNS:
        assert f"{title} AUROC" in text
    tjh_eagrl = expected[("EAG-RL", "tjh")]
    interval = f"[{100 * tjh_eagrl['test/auroc_ci_low']:.1f}, {100 * tjh_eagrl['test/auroc_ci_high']:.1f}]"
    assert f"{100 * tjh_eagrl['test/auroc']:.2f} ± {100 * tjh_eagrl['test/auroc_std']:.2f} {interval}" in text
    # paired differences: every pair, equal to a direct computation on the two runs' predictions
    for a, b in PAIRS:
        assert f"| {a} − {b} |" in text
    (ya, labels), (yb, _) = predictions(runs / "tjh" / "rl"), predictions(runs / "tjh" / "rl_grpo")
    direct = paired_difference(torch.tensor(ya), torch.tensor(yb), torch.tensor(labels), PAIRED_RESAMPLES)
    assert results["paired"]["tjh"]["EAG-RL − GRPO"] == pytest.approx({"patients": 8, **direct})
    assert results["paired"]["mimic_iv_readmission"]["EAG-RL − DAPO"] is None  # DAPO not run there
    strict = next(line for line in text.splitlines() if line.startswith("| EAG-RL |") and "%" in line)
    assert f"{100 * tjh_eagrl['test/strict_parse_rate']:.0f}%" in strict and f"{100 * tjh_eagrl['test/r_att']:.1f}" in strict
    assert "—" in text and "not applicable" in text
    assert "| ConCare | order-invariant by construction |" in text  # no shuffled ConCare numbers
    window_row = next(line for line in text.splitlines() if line.startswith("| ConCare, observation window |"))
    assert f"{100 * expected[('ConCare, observation window', 'tjh')]['test/auroc']:.2f}" in window_row
    assert "(whole stay by definition)" in window_row
    for plot in ("roc_pr_tjh.png", "robustness.png", "cross_dataset.png", "rl_curves_tjh.png"):
        assert (tmp_path / "results" / plot).stat().st_size > 1000, plot
    assert json.loads((tmp_path / "results" / "results.json").read_text())["main"]["EAG-RL"]["tjh"]["patients"] == 8
