"""Percentile intervals and paired bootstrap differences (eagrl.evaluation.metrics) equal a direct
computation on a small hand-made set of predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from eagrl.evaluation.metrics import bootstrap_metrics, paired_difference, percentile_interval, resamples

LABELS = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0])
A = torch.tensor([0.1, 0.3, 0.8, 0.2, 0.7, 0.9, 0.4, 0.35, 0.15, 0.6, 0.65, 0.05])
B = torch.tensor([0.5, 0.4, 0.6, 0.45, 0.3, 0.7, 0.55, 0.5, 0.2, 0.35, 0.4, 0.6])


def _direct_indices(n_bootstrap: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n_bootstrap:
        index = rng.integers(0, len(LABELS), size=len(LABELS))
        if LABELS[index].min() != LABELS[index].max():
            out.append(index)
    return out


def test_resamples_hold_both_outcomes_and_follow_the_seed():
    drawn = resamples(LABELS, 50, seed=3)
    assert all(LABELS[i].min() == 0 and LABELS[i].max() == 1 for i in drawn)
    assert all(np.array_equal(i.numpy(), j) for i, j in zip(drawn, _direct_indices(50, 3)))
    with pytest.raises(ValueError, match="both outcomes"):
        resamples(torch.zeros(5), 10)


def test_percentile_interval_by_hand():
    assert percentile_interval(np.arange(101)) == pytest.approx((2.5, 97.5))
    assert percentile_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_bootstrap_interval_equals_a_direct_computation():
    out = bootstrap_metrics(A, LABELS, n_bootstrap=200, seed=5)
    values = [float(binary_auroc(A[torch.from_numpy(i)], LABELS[torch.from_numpy(i)])) for i in _direct_indices(200, 5)]
    assert out["auroc"] == pytest.approx(np.mean(values))
    assert out["auroc_std"] == pytest.approx(np.std(values, ddof=1))
    assert (out["auroc_ci_low"], out["auroc_ci_high"]) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))
    assert out["auroc_ci_low"] <= out["auroc"] <= out["auroc_ci_high"]


def test_paired_difference_equals_a_direct_computation():
    out = paired_difference(A, B, LABELS, n_bootstrap=300, seed=11)
    for name, metric in (("auroc", binary_auroc), ("auprc", binary_average_precision)):
        whole = float(metric(A, LABELS)) - float(metric(B, LABELS))
        deltas = []
        for i in _direct_indices(300, 11):
            index = torch.from_numpy(i)
            deltas.append(float(metric(A[index], LABELS[index])) - float(metric(B[index], LABELS[index])))
        assert out[f"delta_{name}"] == pytest.approx(whole, abs=1e-6)  # torchmetrics computes in float32
        assert (out[f"delta_{name}_ci_low"], out[f"delta_{name}_ci_high"]) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-6)
    same = paired_difference(A, A, LABELS, n_bootstrap=50)
    assert same["delta_auroc"] == 0.0 and same["delta_auroc_ci_low"] == same["delta_auroc_ci_high"] == 0.0
    with pytest.raises(ValueError, match="one prediction per patient"):
        paired_difference(A, B[:-1], LABELS)


def test_each_reading_of_saved_answers_equals_a_direct_computation(tmp_path, capsys):
    """``eagrl.evaluation.readings``: per reading, the answers it reads and the AUROC of ŷ (unread: 0.5) equal
    ``bootstrap_metrics`` on ŷ parsed that way; a bad file is one clear error naming it and the line."""
    from eagrl.evaluation.metrics import bootstrap_metrics
    from eagrl.evaluation.readings import main, read_each_way
    from eagrl.llm.parsing import parse_probability

    completions = ["<Final Answer> 0.9", "on day 15 of the stay", "<Final Answer> 20%", "value 1.0", "<Final Answer> 73", "no"] * 3
    labels = [1, 0, 0, 1, 1, 0] * 3
    found = read_each_way(completions, labels, n_bootstrap=50)
    assert (found["final_answer"]["read"], found["anywhere"]["read"], found["strict"]["read"]) == (9, 18, 6)
    assert (found["final_answer"]["untagged"], found["anywhere"]["untagged"], found["strict"]["untagged"]) == (0, 9, 0)
    for name, options in (("final_answer", {}), ("anywhere", {"anywhere": True}), ("strict", {"strict": True})):
        y = [parse_probability(t, **options) for t in completions]
        direct = bootstrap_metrics(torch.tensor([0.5 if v is None else v for v in y], dtype=torch.float64), torch.tensor(labels), 50, 0)
        assert found[name]["auroc"] == pytest.approx(direct["auroc"]) and found[name]["auprc_ci_high"] == pytest.approx(direct["auprc_ci_high"])
    assert found["final_answer"]["auroc"] != found["anywhere"]["auroc"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "generations.jsonl").write_text("".join(json.dumps({"completion": c, "label": y}) + "\n" for c, y in zip(completions, labels)))
    main([str(run), "--bootstrap", "20", "--json", str(tmp_path / "readings.json")])
    assert "| anywhere | 18 | 9 |" in capsys.readouterr().out and set(json.loads((tmp_path / "readings.json").read_text())) == set(found)
    (run / "generations.jsonl").write_text('{"completion": "x"}\n')
    with pytest.raises(SystemExit, match=r"generations.jsonl line 1: expected a JSON object with 'completion' and 'label'"):
        main([str(run)])
