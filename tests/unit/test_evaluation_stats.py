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


def test_shuffled_alignment_tells_a_patient_specific_answer_from_a_template():
    """Answers that name each patient's own expert features score R_att 1 against their own top-k and far less against
    other patients'; a template naming the same features for everyone scores the same against both. Each permuted mean
    equals attention_alignment on the expert sets in that permutation's order."""
    from eagrl.evaluation.metrics import shuffled_alignment
    from eagrl.rl.rewards import attention_alignment

    expert = [["Lactate", "Albumin"], ["Sodium", "ALT"], ["Urea", "pH"], ["Glucose", "INR"], ["LDH", "CRP"], ["Age", "WBC"]]
    specific = shuffled_alignment(expert, expert, n_permutations=200, seed=3)
    assert specific["own"] == 1.0 and specific["shuffled"] < 0.3 and specific["specific"] > 0.7
    assert specific["p"] < 0.05  # only the identity (1 permutation in 720) reaches own
    assert specific["shuffled_ci_low"] <= specific["shuffled"] <= specific["shuffled_ci_high"]

    template = [["Lactate", "Sodium"]] * len(expert)
    flat = shuffled_alignment(template, expert, n_permutations=200, seed=3)
    assert flat["own"] == pytest.approx(flat["shuffled"]) and flat["specific"] == pytest.approx(0.0, abs=1e-12)
    assert flat["p"] == 1.0

    rng = np.random.default_rng(5)  # one permutation by hand, with unknown names counted in the union
    unknown = [0, 1, 0, 2, 0, 0]
    direct = float(attention_alignment(template, [expert[j] for j in rng.permutation(len(expert))], unknown).mean())
    assert shuffled_alignment(template, expert, unknown, n_permutations=1, seed=5)["shuffled"] == pytest.approx(direct)
    assert shuffled_alignment(template, expert, unknown, n_permutations=1, seed=5)["own"] == pytest.approx(
        float(attention_alignment(template, expert, unknown).mean())
    )
    with pytest.raises(ValueError, match="one expert set per answer"):
        shuffled_alignment(template, expert[:2])
