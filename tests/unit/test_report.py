"""The results report reads every number from the run directories: every row and column present, each
figure equal to its run's metrics.json, missing runs shown as not run, plots written."""

from __future__ import annotations

import json
import random
import shutil
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
        (folder / "config.yaml").write_text("model:\n  init_args:\n    answer_reading: final_answer\n")
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
    cross = {name: _run(runs / "cross" / name, seed := seed + 1, with_predictions=False) for _, name in CROSS}

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
    # the cross-dataset rows: their strict parse and R_att, beside the same method trained on TJH on as many patients
    cross_eagrl = next(line for line in text.splitlines() if line.startswith("| EAG-RL |") and f"{100 * cross['rl']['test/auroc']:.2f}" in line)
    assert f"{100 * cross['rl']['test/strict_parse_rate']:.0f}% | {100 * cross['rl']['test/r_att']:.1f} | {100 * tjh_eagrl['test/auroc']:.1f} [" in cross_eagrl
    for plot in ("roc_pr_tjh.png", "robustness.png", "cross_dataset.png", "rl_curves_tjh.png"):
        assert (tmp_path / "results" / plot).stat().st_size > 1000, plot
    assert json.loads((tmp_path / "results" / "results.json").read_text())["main"]["EAG-RL"]["tjh"]["patients"] == 8


def test_ablation_rows_share_the_subset_and_the_stage1_and_synthetic_sections(tmp_path):
    """The full EAG-RL row of the ablation table is scored again on the ablations' subset; the stage-1 table counts the
    kept trajectories with R_att > 0; the synthetic section reads the expert's attention on the rule's variables and
    pairs EAG-RL with GRPO on the same patients."""
    from eagrl.evaluation.metrics import bootstrap_metrics

    runs = tmp_path / "runs"
    _run(runs / "tjh" / "rl", 1)  # 8 test patients s0..s7
    _run(runs / "tjh" / "sft", 4)  # the whole split too: paired with the full EAG-RL on the subset only
    subset = ["s1", "s2", "s5", "s6"]
    (runs / "tjh" / "rl_no_att").mkdir(parents=True)
    (runs / "tjh" / "rl_no_att" / "metrics.json").write_text(json.dumps({"test/auroc": 0.5, "test/samples": 4.0, "test/strict_parse_rate": 0.75}))
    rows = [{"id": i, "split": "test", "label": int(i[1]) % 2, "y_hat": y, "parsed_strict": i != "s2", "r_att": 0.0}
            for i, y in zip(subset, (0.3, 0.9, 0.2, 0.6))]  # fmt: skip
    (runs / "tjh" / "rl_no_att" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    full_rows = [json.loads(line) for line in (runs / "tjh" / "rl" / "generations.jsonl").read_text().splitlines()]
    for k, r in enumerate(full_rows):  # the full run's strict parse and R_att differ inside and outside the subset
        r["parsed_strict"], r["r_att"] = r["id"] in subset[:3], 0.1 * k
    (runs / "tjh" / "rl" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full_rows))
    shuffled = runs / "tjh" / "robust" / "rl_100"  # a robustness run on the same subset
    shuffled.mkdir(parents=True)
    (shuffled / "metrics.json").write_text(json.dumps({"test/auroc": 0.6, "test/samples": 4.0}))
    distill = runs / "tjh" / "distill"
    distill.mkdir(parents=True)
    kept = [{"id": "a", "label": 1, "y_hat": 0.8, "r_att": 0.0}, {"id": "b", "label": 0, "y_hat": 0.8, "r_att": 0.2},
            {"id": "c", "label": 0, "y_hat": 0.1, "r_att": 0.5}]  # fmt: skip
    (distill / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (distill / "trajectories.jsonl.done").write_text("a\nb\nc\nd\ne\n")
    synthetic = runs / "synthetic"
    _run(synthetic / "rl", 2)
    _run(synthetic / "rl_grpo", 3)
    (synthetic / "concare").mkdir(parents=True)
    expert = [{"id": "x", "split": "test", "label": 1, "prob": 0.9, "top_k": ["Lactate", "Sodium"],
               "features": [["Lactate", 0.5], ["Creatinine", 0.2], ["Sodium", 0.3]]},
              {"id": "y", "split": "test", "label": 0, "prob": 0.1, "top_k": ["Sodium", "ALT"],
               "features": [["Sodium", 0.9], ["Albumin", 0.1]]}]  # fmt: skip
    (synthetic / "concare" / "expert_attention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expert))

    results = build(runs, tmp_path / "results")
    full = results["ablation"]["EAG-RL (full)"]
    ys = {r["id"]: r for r in map(json.loads, (runs / "tjh" / "rl" / "generations.jsonl").read_text().splitlines())}
    direct = bootstrap_metrics(torch.tensor([ys[i]["y_hat"] for i in subset]), torch.tensor([ys[i]["label"] for i in subset]), 100)
    assert full["patients"] == 4 and full["auroc"] == pytest.approx(direct["auroc"]) and full["auroc_std"] == pytest.approx(direct["auroc_std"])
    assert results["main"]["EAG-RL"]["tjh"]["patients"] == 8  # the main table keeps the whole test split
    assert results["robustness"]["EAG-RL"]["0"] == full and results["robustness"]["EAG-RL"]["100"]["auroc"] == 0.6  # 0%: on the subset too
    # strict parse and R_att on the subset's patients only (s1, s2, s5 strict of s1, s2, s5, s6; R_att 0.1 x row index)
    assert full["strict_parse_rate"] == pytest.approx(3 / 4) and full["r_att"] == pytest.approx((0.1 + 0.2 + 0.5 + 0.6) / 4)
    assert results["ablation"]["without R_att"]["strict_parse_rate"] == pytest.approx(3 / 4)  # its own metrics.json
    # the ablation − full difference: a direct paired computation on the subset, in subset order
    by_id = {r["id"]: r for r in full_rows}
    direct = paired_difference(torch.tensor([0.3, 0.9, 0.2, 0.6]), torch.tensor([by_id[i]["y_hat"] for i in subset]),
                               torch.tensor([int(i[1]) % 2 for i in subset]), PAIRED_RESAMPLES)  # fmt: skip
    assert results["ablation_paired"]["without R_att − EAG-RL (full)"] == pytest.approx({"patients": 4, **direct})
    assert results["ablation_paired"]["without ε(τ) − EAG-RL (full)"] is None  # not run
    assert results["ablation_paired"]["without stage 2 (SFT only) − EAG-RL (full)"]["patients"] == 4
    text = (tmp_path / "results" / "results.md").read_text()
    d = direct["delta_auroc"]
    assert any(line.startswith("| without R_att |") and f"{100 * d:+.1f} [" in line and "| 75% |" in line for line in text.splitlines())
    stage1 = results["stage1"]["tjh"]
    assert stage1["patients_searched"] == 5 and stage1["trajectories_kept"] == 3
    assert stage1["share_r_att_positive"] == pytest.approx(2 / 3) and stage1["share_correct"] == pytest.approx(2 / 3)
    check = results["synthetic"]
    assert check["expert"]["attention_on_rule_positives"] == pytest.approx(0.7) and check["expert"]["attention_on_rule_negatives"] == pytest.approx(0.1)
    assert check["expert"]["top_k_slots_on_rule"] == pytest.approx(0.25)
    (ya, labels), (yb, _) = predictions(synthetic / "rl"), predictions(synthetic / "rl_grpo")
    direct = paired_difference(torch.tensor(ya), torch.tensor(yb), torch.tensor(labels), PAIRED_RESAMPLES)
    assert check["paired"]["EAG-RL − GRPO"] == pytest.approx({"patients": 8, **direct})
    text = (tmp_path / "results" / "results.md").read_text()
    assert "## Mechanism check: the synthetic cohort" in text and "| TJH mortality | 5 | 3 | 3 | 67% |" in text
    assert "rl_curves_synthetic.png" in results["plots"]


def test_reward_trend_and_second_seeds(tmp_path):
    from eagrl.evaluation.report import flat_groups, reward_trend

    flat = reward_trend([0.1, 0.2, 0.1, 0.2, 0.1] * 2)
    assert flat["difference"] == pytest.approx(0.0) and abs(flat["z"]) < 1e-9
    rising = reward_trend([0.1, 0.2, 0.1, 0.2, 0.1, 0.5, 0.6, 0.5, 0.6, 0.5, 0.6])
    first, last = [0.1, 0.2, 0.1, 0.2, 0.1], [0.6, 0.5, 0.6, 0.5, 0.6]
    se = (torch.tensor(first).var() / 5 + torch.tensor(last).var() / 5).sqrt().item()
    assert rising["difference"] == pytest.approx(0.42) and rising["se"] == pytest.approx(se) and rising["z"] == pytest.approx(0.42 / se)
    assert reward_trend([0.1] * 9) is None  # too short to tell
    assert flat_groups([1.0] * 5 + [0.5, 0.5, 0.0, 0.0, 0.0]) == pytest.approx({"first": 0.0, "last": 0.8})
    assert flat_groups([1.0] * 9) is None

    runs = tmp_path / "runs"
    _run(runs / "tjh" / "rl", 1)
    _run(runs / "tjh" / "rl_seed1", 2)
    results = build(runs, tmp_path / "results")
    assert set(results["seeds"]["tjh"]["EAG-RL"]) == {"main", "1"}
    assert set(results["reward_trends"]["tjh"]) == {"EAG-RL", "EAG-RL (seed1)"} and results["reward_trends"]["tjh"]["EAG-RL"] is None
    text = (tmp_path / "results" / "results.md").read_text()
    assert "## Seed noise" in text
    # seed − main: a direct paired computation on the two runs' ŷ, and the share of patients whose ŷ differs
    (ys, labels), (ym, _) = predictions(runs / "tjh" / "rl_seed1"), predictions(runs / "tjh" / "rl")
    direct = paired_difference(torch.tensor(ys), torch.tensor(ym), torch.tensor(labels), PAIRED_RESAMPLES)
    seed1 = results["seeds"]["tjh"]["EAG-RL"]["1"]
    assert seed1["vs_main"] == pytest.approx({"patients": 8, **direct}) and seed1["yhat_differ"] == 1.0
    row = next(line for line in text.splitlines() if line.startswith("| TJH mortality | EAG-RL | 1 |"))
    assert f"{100 * direct['delta_auroc']:+.1f} [" in row and row.endswith("| 100% |")


def test_reward_trend_reports_the_groups_that_carried_no_signal(tmp_path):
    """A run that logs train/groups_varied: the report gives the share of groups with one reward, first and last 5
    rollouts; a run that does not log it says so."""
    runs = tmp_path / "runs"
    for name, varied in (("rl", [1.0] * 5 + [0.5] * 5 + [0.0] * 2), ("rl_grpo", None)):
        logs = runs / "tjh" / name / "logs/version_0"
        logs.mkdir(parents=True)
        header = "epoch,step,train/reward" + (",train/groups_varied" if varied else "")
        rows = [f"0,{k},{0.1 * k}" + (f",{varied[k]}" if varied else "") for k in range(12)]
        (logs / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    results = build(runs, tmp_path / "results")
    assert results["reward_trends"]["tjh"]["EAG-RL"]["flat"] == pytest.approx({"first": 0.0, "last": 1 - (0.5 * 3) / 5})
    assert "flat" not in results["reward_trends"]["tjh"]["GRPO"]
    text = (tmp_path / "results" / "results.md").read_text()
    assert next(line for line in text.splitlines() if line.startswith("| TJH mortality | EAG-RL | 12 |")).endswith("| 0% → 70% |")
    assert next(line for line in text.splitlines() if line.startswith("| TJH mortality | GRPO | 12 |")).endswith("| not logged |")


def _direct_calibration(probs: list[float], labels: list[int]) -> tuple[float, float]:
    """Brier and ECE (10 equal-width bins, a bin holding low < p <= high, the first also p = 0) by hand."""
    n, ece = len(probs), 0.0
    for b in range(10):
        inside = [(p, y) for p, y in zip(probs, labels) if (b / 10 < p <= (b + 1) / 10) or (b == 0 and p == 0)]
        if inside:
            ece += len(inside) / n * abs(sum(p for p, _ in inside) / len(inside) - sum(y for _, y in inside) / len(inside))
    return sum((p - y) ** 2 for p, y in zip(probs, labels)) / n, ece


def test_calibration_equals_a_direct_computation_and_is_plotted(tmp_path):
    from eagrl.evaluation.metrics import calibration

    probs = [0.02, 0.13, 0.17, 0.34, 0.55, 0.96, 0.94, 0.23, 0.31, 1.0, 0.0, 0.08]  # none on a bin edge but 0 and 1
    labels = [0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    result = calibration(torch.tensor(probs, dtype=torch.double), torch.tensor(labels))
    brier, ece = _direct_calibration(probs, labels)
    assert result["brier"] == pytest.approx(brier, abs=1e-9) and result["ece"] == pytest.approx(ece, abs=1e-6)
    assert sum(b["patients"] for b in result["bins"]) == len(probs)
    assert [b["observed"] for b in result["bins"]][:2] == [0.0, 0.5]  # bin 0: 0.02, 0.0, 0.08 all alive; bin 1: 0.13, 0.17
    perfect = calibration(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 1, 1]))
    assert perfect["brier"] == 0.0 and perfect["ece"] == 0.0

    runs = tmp_path / "runs"
    folder = runs / "tjh" / "rl"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"test/auroc": 0.7, "test/samples": 12.0}))
    rows = [{"id": f"s{k}", "split": "test", "label": y, "y_hat": p} for k, (p, y) in enumerate(zip(probs, labels))]
    rows.append({"id": "unparsed", "split": "test", "label": 1, "y_hat": None})  # counts as 0.5, as in the metrics
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = build(runs, tmp_path / "results")
    cell = results["calibration"]["tjh"]["EAG-RL"]
    brier, ece = _direct_calibration(probs + [0.5], labels + [1])
    assert cell["patients"] == 13 and cell["brier"] == pytest.approx(brier, abs=1e-9) and cell["ece"] == pytest.approx(ece, abs=1e-6)
    assert "calibration.png" in results["plots"] and (tmp_path / "results" / "calibration.png").is_file()
    assert f"| TJH mortality | EAG-RL | {brier:.3f} | {ece:.3f} | 13 |" in (tmp_path / "results" / "results.md").read_text()


def test_subgroup_metrics_and_their_report_table(tmp_path):
    from eagrl.evaluation.metrics import binary_metrics, subgroup_metrics

    g = torch.Generator().manual_seed(0)
    n = 120
    labels = (torch.arange(n) % 3 == 0).long()  # 40 positives
    probs = (0.3 * labels + 0.7 * torch.rand(n, generator=g)).double()
    sex = (torch.arange(n) % 2).double()
    age = torch.where(torch.arange(n) < 20, 40.0, torch.where(torch.arange(n) < 70, 60.0, 80.0)).double()
    age[5] = float("nan")  # unknown age: in no band
    found = subgroup_metrics(probs, labels, sex, age)
    assert found["subgroup_sex_male_patients"] == 60 and found["subgroup_sex_female_patients"] == 60
    assert found["subgroup_age_lt50_patients"] == 19 and found["subgroup_age_50_70_patients"] == 50 and found["subgroup_age_gt70_patients"] == 50
    male = sex == 1
    assert found["subgroup_sex_male_auroc"] == pytest.approx(binary_metrics(probs[male], labels[male])["auroc"])
    assert found["subgroup_age_lt50_positives"] == int(labels[:20][torch.arange(20) != 5].sum()) < 10
    assert "subgroup_age_lt50_auroc" not in found  # fewer than 10 positives: too small for a number

    run = tmp_path / "runs" / "tjh" / "concare"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"test/auroc": 0.8, **{f"test/{k}": v for k, v in found.items()}}))
    results = build(tmp_path / "runs", tmp_path / "results")
    assert results["subgroups"]["tjh"]["ConCare"]["age_lt50"]["auroc"] is None
    text = (tmp_path / "results" / "results.md").read_text()
    assert f"| TJH mortality | ConCare | {100 * found['subgroup_sex_male_auroc']:.1f} (n 60, n+ 20) |" in text
    assert f"too small (n 19, n+ {int(found['subgroup_age_lt50_positives'])})" in text


def test_the_share_of_differing_answers_between_trained_rows(tmp_path):
    """SFT and GRPO answer 10 shared patients; 3 ŷ differ (one of them unparsed, read as 0.5) -> 30%; an identical
    copy of SFT as DAPO -> 0%, marked below the 10% aim; a pair with a missing run -> none."""
    runs = tmp_path / "runs" / "tjh"
    sft = [0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05, 0.95]
    grpo = list(sft)
    grpo[0], grpo[3], grpo[7] = 0.2, 0.7000001, None  # 0.7000001: within 1e-6, the same answer
    grpo[5] = 0.5
    for name, ys in (("sft", sft), ("rl_grpo", grpo), ("rl_dapo", sft)):
        (runs / name).mkdir(parents=True)
        rows = [{"id": f"s{k}", "split": "test", "label": k % 2, "y_hat": y} for k, y in enumerate(ys)]
        rows.append({"id": "val0", "split": "val", "label": 0, "y_hat": 0.3 if name == "sft" else 0.9})  # not a test patient
        (runs / name / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = build(tmp_path / "runs", tmp_path / "results")
    tjh = results["answer_differences"]["tjh"]
    assert tjh["SFT vs GRPO"] == {"patients": 10, "differ": pytest.approx(0.3)}
    assert tjh["SFT vs DAPO"] == {"patients": 10, "differ": 0.0}
    assert tjh["SFT vs EAG-RL"] is None
    text = (tmp_path / "results" / "results.md").read_text()
    assert "| SFT vs GRPO | — | 0 | 30% | 10 |" in text and "| SFT vs DAPO | — | 0 | 0% ✗ | 10 |" in text


def test_what_the_llm_rows_write_is_counted_from_their_answers(tmp_path):
    """The answer profile counts distinct ŷ, ŷ >= 0.5 among parsed answers, answers naming an expert feature, the most
    named and most expert-ranked features and the cut-off answers; the report shows it without any text or id."""
    from eagrl.evaluation.report import answer_profile

    run = tmp_path / "runs" / "tjh" / "rl"
    run.mkdir(parents=True)
    expert = ["Lactate", "Albumin"]
    rows = [  # 4 test patients, one val row that must not count
        {"id": "p0", "split": "test", "label": 1, "y_hat": 0.8, "features": ["Lactate", "Sodium"], "expert_top_k": expert, "r_att": 0.33, "new_tokens": 40, "finished": True},
        {"id": "p1", "split": "test", "label": 0, "y_hat": 0.2, "features": ["Sodium"], "expert_top_k": ["Sodium", "ALT"], "r_att": 0.5, "new_tokens": 96, "finished": False},
        {"id": "p2", "split": "test", "label": 1, "y_hat": 0.8, "features": ["Sodium", "Sodium"], "expert_top_k": expert, "r_att": 0.0, "new_tokens": 50, "finished": True},
        {"id": "p3", "split": "test", "label": 0, "y_hat": None, "features": [], "expert_top_k": expert, "r_att": 0.0, "new_tokens": 96, "finished": False},
        {"id": "v0", "split": "val", "label": 0, "y_hat": 0.9, "features": ["ALT"], "expert_top_k": expert, "r_att": 1.0, "new_tokens": 1, "finished": True},
    ]  # fmt: skip
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    profile = answer_profile(run)
    assert profile["patients"] == 4 and profile["distinct_yhat"] == 2
    assert profile["share_yhat_positive"] == pytest.approx(2 / 3)  # 2 of the 3 parsed
    assert profile["share_naming_expert"] == pytest.approx(0.5)
    assert profile["most_named"] == [["Sodium", 0.75], ["Lactate", 0.25]]  # a name counts once per answer
    assert profile["expert_most_ranked"][:2] == [["Albumin", 0.75], ["Lactate", 0.75]]
    assert profile["median_new_tokens"] == 96 and profile["share_cut_off"] == pytest.approx(0.5)
    assert profile["answered"] == 3 and profile["answered_with_outcome"] == 1.0 and profile["answered_without_outcome"] == 0.5
    assert profile["auroc_answered"] == 1.0  # p0, p2 (0.8, died) above p1 (0.2, survived); p3 (unread) left out
    build(tmp_path / "runs", tmp_path / "results")
    text = (tmp_path / "results" / "results.md").read_text()
    assert "## What the LLM rows write" in text
    own = (1 / 3 + 1 / 2 + 0 + 0) / 4  # Jaccard of the named set and the patient's own top-k: p0, p1, p2, p3
    assert profile["r_att_shuffled"]["own"] == pytest.approx(own)
    assert profile["r_att_shuffled"]["shuffled"] < own  # p1 names its own (uncommon) expert feature
    shuffled = profile["r_att_shuffled"]
    cell = f"{100 * own:.1f} / {100 * shuffled['shuffled']:.1f} (p {shuffled['p']:.3f})"
    assert f"| EAG-RL | 4 | 2 | 67% | 50% | Sodium (75%), Lactate (25%) | {cell} | 96 | 50% | 100% / 50% | 100.0 (3) |" in text
    assert "p0" not in text and "p1" not in text

    rows[0]["y_hat"], rows[2]["y_hat"] = 0.1, 0.1  # the deaths now answered below the survivor: the AUROC over answers flips
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert answer_profile(run)["auroc_answered"] == 0.0
    rows[1]["y_hat"] = None  # only deaths answered: no AUROC over answers
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert answer_profile(run)["auroc_answered"] is None and answer_profile(run)["answered_without_outcome"] == 0.0


def test_cells_whose_runs_are_absent_are_carried_from_an_earlier_report(tmp_path):
    """--previous: what the current runs lack comes whole from the earlier results.json and is listed with the report it
    first came from; what they hold is theirs; a pair with one fresh run is not carried; the ablation table is carried
    only as a whole, the robustness table cell by cell with its method's TJH run; the earlier report's plots stay
    listed; a missing or unreadable file is one clear error."""
    from eagrl.evaluation.report import EAGRLInputError, _first_entry, carry_over

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    vanilla = _run(first / "tjh" / "prompting_vanilla", 1)
    _run(first / "tjh" / "rl", 2)
    _run(first / "tjh" / "sft", 4)
    _run(first / "tjh" / "rl_no_att", 5)
    _run(first / "tjh" / "robust" / "rl_100", 7)
    _run(first / "tjh" / "robust" / "prompting_decomposition_100", 8)
    out = tmp_path / "results"
    earlier = build(first, out)
    assert "roc_pr_tjh.png" in earlier["plots"] and earlier["paired"]["tjh"]["EAG-RL − SFT"] is not None
    eagrl = _run(second / "tjh" / "rl", 3)  # re-run: its cell must be the new one
    base_20 = _run(second / "tjh" / "robust" / "prompting_decomposition_20", 9)  # a robustness cell the first lacked
    results = build(second, out, previous=out / "results.json")
    assert results["main"]["Vanilla"]["tjh"]["auroc"] == vanilla["test/auroc"]  # carried
    assert results["main"]["EAG-RL"]["tjh"]["auroc"] == eagrl["test/auroc"]  # not carried
    assert results["main"]["GRPO"]["tjh"] is None  # in neither
    assert results["paired"]["tjh"]["EAG-RL − SFT"] is None  # its EAG-RL side is fresh: the old pair would mislead
    assert results["paired"]["tjh"]["Vanilla − Question Decomposition"] is None  # never computed
    assert results["ablation"] == earlier["ablation"]  # no ablation run here: the whole earlier table
    assert results["robustness"]["Base LLM (Question Decomposition)"]["20"]["auroc"] == base_20["test/auroc"]
    assert earlier["robustness"]["EAG-RL"]["100"] is not None and results["robustness"]["EAG-RL"]["100"] is None  # tjh/rl re-run
    # robustness cells are carried one by one, with the method's TJH run: a retrained model's old shuffled runs are not
    base, eag = "Base LLM (Question Decomposition)", "EAG-RL"
    current = {"main": {"Question Decomposition": {"tjh": None}, "EAG-RL": {"tjh": {"auroc": 0.7}}},
               "robustness": {base: {"0": None, "20": {"auroc": 0.5}, "100": None}, eag: {"0": None, "100": None}}}  # fmt: skip
    old = {"main": {"Question Decomposition": {"tjh": {"auroc": 0.5}}, "EAG-RL": {"tjh": {"auroc": 0.6}}},
           "robustness": {base: {"0": {"auroc": 0.5}, "20": {"auroc": 0.1}, "100": {"auroc": 0.5}}, eag: {"0": {"auroc": 0.6}, "100": {"auroc": 0.55}}}}  # fmt: skip
    taken = carry_over(current, old)
    assert current["robustness"][base] == {"0": {"auroc": 0.5}, "20": {"auroc": 0.5}, "100": {"auroc": 0.5}}
    assert current["robustness"][eag] == {"0": None, "100": None}
    assert f"robustness/{base}/100" in taken and f"robustness/{base}/20" not in taken
    assert results["answers"]["tjh"]["EAG-RL"]["patients"] == 8 and results["answers"]["tjh"]["SFT"] == earlier["answers"]["tjh"]["SFT"]
    paths = [e["path"] for e in results["facts"]["carried_over"]["entries"]]
    assert "main/Vanilla/tjh" in paths and "main/EAG-RL/tjh" not in paths and "ablation" in paths and "answers/tjh/EAG-RL" not in paths
    text = (out / "results.md").read_text()
    assert "entries are not from these runs" in text and "main/Vanilla/tjh" in text
    assert f"{100 * vanilla['test/auroc']:.2f}" in text
    first_report = earlier["facts"]["generated"]
    _run(third / "tjh" / "rl_grpo", 6)  # a third report keeps where each entry first came from
    later = build(third, out, previous=out / "results.json")
    origin = {e["path"]: e["generated"] for e in later["facts"]["carried_over"]["entries"]}
    assert origin["main/Vanilla/tjh"] == first_report and origin["main/EAG-RL/tjh"] == results["facts"]["generated"]
    # a report that carried the robustness table whole names that entry "robustness": its cells keep where it came from
    assert _first_entry({"robustness": {"generated": "then"}}, "robustness/EAG-RL/20") == {"generated": "then"}
    assert _first_entry({"robustness": {"generated": "then"}}, "ablation") == {}
    with pytest.raises(EAGRLInputError, match="nowhere.json"):
        build(second, out, previous=tmp_path / "nowhere.json")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"main": {"SFT": {"tjh": {"auroc": 0.7}}}, "facts": {"answer_reading": {}}}))
    before = (out / "results.md").read_text()
    with pytest.raises(EAGRLInputError, match="broken.json: not a results.json this version can read"):
        build(second, out, previous=broken)
    assert (out / "results.md").read_text() == before  # nothing written


def test_llm_entries_read_the_older_way_are_flagged_and_not_carried(tmp_path):
    """A run configured before ``answer_reading`` existed read ŷ anywhere in the completion (echoed patient data
    included): the report names it; an earlier report without the ``answer_reading`` fact gives only what no LLM
    answer decided (ConCare's rows), and says what it left."""
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "results"
    concare = _run(first / "tjh" / "concare", 1, with_predictions=False)  # ConCare writes no LLM answers
    _run(first / "tjh" / "prompting_decomposition", 2)
    (first / "tjh" / "prompting_decomposition" / "config.yaml").write_text("model:\n  init_args:\n    scorer: parse\n")  # an older run
    _run(first / "tjh" / "prompting_vanilla", 3)
    (first / "tjh" / "prompting_vanilla" / "config.yaml").write_text("model:\n  init_args:\n    scorer: token_probability\n")
    earlier = build(first, out)
    assert earlier["facts"]["answer_reading"] == {"tjh/prompting_decomposition": "anywhere", "tjh/prompting_vanilla": "token_probability"}
    flagged = next(line for line in (out / "results.md").read_text().splitlines() if "read the older way" in line)
    assert "tjh/prompting_decomposition" in flagged and "tjh/prompting_vanilla" not in flagged
    _run(second / "tjh" / "rl", 4)
    alone = build(second, tmp_path / "alone")["plots"]
    for facts in ("named", "absent"):  # the fact names the run; a report written before the fact existed
        target = tmp_path / facts
        shutil.copytree(out, target)  # the earlier report and its plots where the new one is written
        if facts == "absent":
            earlier_json = json.loads((target / "results.json").read_text())
            del earlier_json["facts"]["answer_reading"]
            (target / "results.json").write_text(json.dumps(earlier_json))
        results = build(second, target, previous=target / "results.json")
        assert results["main"]["ConCare"]["tjh"]["auroc"] == concare["test/auroc"]  # carried: no LLM answer in it
        assert results["main"]["Question Decomposition"]["tjh"] is None and results["main"]["Vanilla"]["tjh"] is None
        assert results["paired"]["tjh"]["EAG-RL − Question Decomposition"] is None
        text = (target / "results.md").read_text()
        assert "not carried: the LLM entries and plots of" in text and "**read the older way" not in text
        assert results["facts"]["answer_reading"] == {"tjh/rl": "final_answer"}  # written, so a later report carries its LLM rows
        assert results["plots"] == alone  # no earlier plot (drawn from answers read the older way) stays listed
    assert "every run (written before answer_reading existed)" in (tmp_path / "absent" / "results.md").read_text()
    fresh = build(second, tmp_path / "later", previous=tmp_path / "named" / "results.json")  # a report whose runs read the span
    assert fresh["main"]["EAG-RL"]["tjh"] is not None and "not_carried" not in fresh["facts"]


def test_run_facts_follow_symlinked_run_folders(tmp_path):
    """A report built over linked run folders (runs/tjh/rl -> elsewhere) reads their revision, backbone and answer
    reading as it does for real folders (Path.glob("**") before Python 3.13 skipped them: the header showed "?")."""
    from eagrl.evaluation.report import _run_facts

    elsewhere = tmp_path / "kept" / "rl"
    elsewhere.mkdir(parents=True)
    (elsewhere / "run_info.json").write_text(json.dumps({"git_revision": "abc1234", "versions": {"torch": "2.13.0"}}))
    (elsewhere / "config.yaml").write_text("model:\n  init_args:\n    answer_reading: final_answer\n    backbone:\n      name: tiny-llama\n")
    (elsewhere / "generations.jsonl").write_text(json.dumps({"id": "s0", "split": "test", "label": 1, "y_hat": 0.7}) + "\n")
    (tmp_path / "runs" / "tjh").mkdir(parents=True)
    (tmp_path / "runs" / "tjh" / "rl").symlink_to(elsewhere, target_is_directory=True)
    facts = _run_facts(tmp_path / "runs")
    assert facts["git_revision"] == "abc1234" and facts["llm_backbones"] == ["tiny-llama"]
    assert facts["answer_reading"] == {"tjh/rl": "final_answer"}


def test_cross_rows_show_the_tjh_trained_method_only_on_as_many_patients(tmp_path):
    """The generalisation table's "trained on TJH" column takes the ablation or robustness cell of the same method only
    when it scored as many patients as the cross run (the fixed subset); a main run on the whole split shows "—"."""
    from eagrl.evaluation.report import _on_tjh_text

    results = {"ablation": {"EAG-RL (full)": {"auroc": 0.772, "auroc_ci": [0.69, 0.85], "patients": 100}, "without stage 2 (SFT only)": {"auroc": 0.45, "patients": 199}},
               "robustness": {"Base LLM (Question Decomposition)": {"0": {"auroc": 0.5, "patients": 100}}}}  # fmt: skip
    assert _on_tjh_text(results, "EAG-RL", {"patients": 100}) == "77.2 [69.0, 85.0]"
    assert _on_tjh_text(results, "Base LLM (Question Decomposition)", {"patients": 100}) == "50.0"
    assert _on_tjh_text(results, "SFT", {"patients": 100}) == "—"  # its cell scored the whole split, not the subset
    assert _on_tjh_text(results, "EAG-RL", None) == "—"  # the cross run is missing
    assert _on_tjh_text({}, "EAG-RL", {"patients": 100}) == "—"  # no TJH run


def test_report_names_runs_that_generated_in_different_dtypes(tmp_path, capsys):
    """Under ``generation_dtype: auto`` a busy machine can tip two runs into different dtypes (greedy answers then
    differ by the dtype alone): the report's header names each dtype's runs, and says nothing more when they agree."""
    from eagrl.evaluation.report import main

    runs = tmp_path / "runs"
    for k, name in enumerate(["sft", "rl_grpo", "rl"]):
        _run(runs / "tjh" / name, k)
    for name, dtype in [("sft", "float32"), ("rl_grpo", "float32"), ("rl", "float32")]:
        path = runs / "tjh" / name / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "generation": {"dtype": dtype, "dtype_choice": "auto"}}))
    same = build(runs, tmp_path / "same")
    assert same["facts"]["generation_dtype"] == {"tjh/rl": "float32", "tjh/rl_grpo": "float32", "tjh/sft": "float32"}
    text = (tmp_path / "same" / "results.md").read_text()
    assert "LLM generation in float32 for every run" in text and "different dtypes" not in text

    path = runs / "tjh" / "rl" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "generation": {"dtype": "bfloat16", "dtype_choice": "auto"}}))
    main(["--runs", str(runs), "--out", str(tmp_path / "mixed")])
    text = (tmp_path / "mixed" / "results.md").read_text()
    assert "the LLM runs generated in different dtypes" in text
    assert "bfloat16: tjh/rl; float32: tjh/rl_grpo, tjh/sft" in text
    assert "warning: the LLM runs generated in different dtypes" in capsys.readouterr().out


def test_a_run_that_has_not_ended_is_left_out_and_named(tmp_path):
    """A stage that started (its ``run_info.json``) and has not written a newer ``metrics.json`` (still running, or
    killed) is read as missing: no cell, no stage-1 summary, no reward trend; the header and the CLI name it. Once its
    ``metrics.json`` is written after it, it is read."""
    import os

    from eagrl.evaluation.report import main

    runs = tmp_path / "runs"
    _run(runs / "tjh" / "rl", 1)  # a rerun in progress over an older finished one: metrics.json older than run_info.json
    _run(runs / "tjh" / "rl_grpo", 2)  # ended: metrics.json newer than run_info.json
    for name, age in (("rl", 0), ("rl_grpo", 100)):
        info = runs / "tjh" / name / "run_info.json"
        info.write_text(json.dumps({"stage": "fit"}))
        os.utime(info, (info.stat().st_mtime - age,) * 2)
        os.utime(runs / "tjh" / name / "metrics.json", (info.stat().st_mtime - 50,) * 2)
    (runs / "tjh" / "rl_grpo" / "metrics.json").touch()
    for k in range(10):  # enough rollouts for a trend
        with open(next((runs / "tjh" / "rl_grpo" / "logs").glob("*/metrics.csv")), "a") as handle:
            handle.write(f"0,{3 + k},{0.1 * k},0.5,0.1,0.0\n")
    for name, after in (("rl_dapo", "true"), ("rl_no_att", "false")):  # fits whose training ended: metrics.json of it alone
        _run(runs / "tjh" / name, 3)
        (runs / "tjh" / name / "run_info.json").write_text(json.dumps({"stage": "fit", "command": ["fit"]}))
        (runs / "tjh" / name / "metrics.json").write_text(json.dumps({"train/reward": 0.1}))
        (runs / "tjh" / name / "config.yaml").write_text(f"model:\n  init_args:\n    answer_reading: final_answer\n    test_after_fit: {after}\n")
    distill = runs / "tjh" / "distill"  # stage 1 still searching: trajectories.jsonl grows, no metrics.json yet
    distill.mkdir(parents=True)
    (distill / "run_info.json").write_text(json.dumps({"stage": "predict"}))
    (distill / "trajectories.jsonl").write_text(json.dumps({"id": "a", "label": 1, "y_hat": 0.8, "r_att": 0.5}) + "\n")

    results = build(runs, tmp_path / "results")
    assert results["facts"]["unfinished"] == ["tjh/distill", "tjh/rl", "tjh/rl_dapo"]  # DAPO: testing after its fit
    assert "DAPO" not in results["reward_trends"]["tjh"] and "without R_att" in results["reward_trends"]["tjh"]  # read: no test after its fit
    assert results["main"]["EAG-RL"]["tjh"] is None and results["main"]["GRPO"]["tjh"] is not None
    assert results["stage1"]["tjh"] is None
    assert "EAG-RL" not in results["reward_trends"]["tjh"] and results["reward_trends"]["tjh"]["GRPO"]["rollouts"] == 13
    assert results["paired"]["tjh"]["EAG-RL − GRPO"] is None
    header = (tmp_path / "results" / "results.md").read_text().split("\n## ")[0]
    assert "left out, still running or stopped before its end" in header and "tjh/distill, tjh/rl, tjh/rl_dapo" in header

    (distill / "metrics.json").write_text(json.dumps({"generation": {"dtype": "float32"}}))  # the search ended
    results = build(runs, tmp_path / "results")
    assert results["facts"]["unfinished"] == ["tjh/rl", "tjh/rl_dapo"] and results["stage1"]["tjh"]["trajectories_kept"] == 1
    (runs / "tjh" / "rl_dapo" / "metrics.json").write_text(json.dumps({"train/reward": 0.1, "test/auroc": 0.5}))  # tested
    (runs / "tjh" / "rl" / "metrics.json").touch()  # and so did the fit
    main(["--runs", str(runs), "--out", str(tmp_path / "results")])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["facts"]["unfinished"] == [] and results["main"]["EAG-RL"]["tjh"] is not None
    results_before_rerun = results["main"]["EAG-RL"]["tjh"]
    finished = tmp_path / "finished.json"
    shutil.copy(tmp_path / "results" / "results.json", finished)
    (runs / "tjh" / "rl" / "run_info.json").touch()  # EAG-RL runs again: its finished entries are carried meanwhile
    os.utime(runs / "tjh" / "rl" / "metrics.json", (finished.stat().st_mtime - 10,) * 2)
    results = build(runs, tmp_path / "results", previous=finished)
    assert results["facts"]["unfinished"] == ["tjh/rl"] and results["main"]["EAG-RL"]["tjh"] == results_before_rerun
    assert "main/EAG-RL/tjh" in [e["path"] for e in results["facts"]["carried_over"]["entries"]]


def test_a_resumed_fits_curves_join_its_logger_versions(tmp_path):
    """A fit killed after rollout 6 with its last checkpoint after rollout 4, resumed (version_2 from step 5, the
    killed rollouts 5-6 trained again), then killed again and resumed (version_10 from step 9, read after version_2
    though it sorts before it as text): the curve holds every rollout once, each from the latest version that logged
    it; a version that starts over (step 0) replaces all before it."""
    from eagrl.evaluation.report import _metrics_csv

    run = tmp_path / "rl"
    versions = {0: [(s, 0.0) for s in range(7)], 2: [(s, 2.0) for s in range(5, 10)], 10: [(s, 10.0) for s in range(9, 12)]}
    for version, rows in versions.items():
        logs = run / f"logs/version_{version}"
        logs.mkdir(parents=True)
        lines = ["epoch,step,train/reward", *(f"0,{step},{value}" for step, value in rows), "0,11,"]  # a test row: no reward
        (logs / "metrics.csv").write_text("\n".join(lines) + "\n")
    got = [(int(r["step"]), float(r["train/reward"])) for r in _metrics_csv(run)]
    assert got == [(s, 0.0) for s in range(5)] + [(s, 2.0) for s in range(5, 9)] + [(s, 10.0) for s in range(9, 12)]
    logs = run / "logs/version_11"  # the fit started over from empty: only it counts
    logs.mkdir()
    (logs / "metrics.csv").write_text("epoch,step,train/reward\n0,0,5.0\n0,1,6.0\n")
    assert [float(r["train/reward"]) for r in _metrics_csv(run)] == [5.0, 6.0]


def test_without_ablation_runs_the_robustness_0_cell_is_on_the_shuffled_runs_patients(tmp_path):
    """The shuffled runs answer the pipeline's fixed subset; with no ablation run under the runs folder (as when they
    are not retrained yet), the 0% cell is still the main run scored on those patients, not on the whole split."""
    from eagrl.evaluation.metrics import bootstrap_metrics

    runs = tmp_path / "runs"
    _run(runs / "tjh" / "rl", 1)  # 8 test patients s0..s7
    subset = ["s0", "s3", "s4", "s7"]
    shuffled = runs / "tjh" / "robust" / "rl_20"
    shuffled.mkdir(parents=True)
    (shuffled / "metrics.json").write_text(json.dumps({"test/auroc": 0.6, "test/samples": 4.0}))
    rows = [{"id": i, "split": "test", "label": int(i[1]) % 2, "y_hat": y} for i, y in zip(subset, (0.3, 0.9, 0.2, 0.6))]
    (shuffled / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = build(runs, tmp_path / "results")
    ys = {r["id"]: r for r in map(json.loads, (runs / "tjh" / "rl" / "generations.jsonl").read_text().splitlines())}
    direct = bootstrap_metrics(torch.tensor([ys[i]["y_hat"] for i in subset]), torch.tensor([ys[i]["label"] for i in subset]), 100)
    zero = results["robustness"]["EAG-RL"]["0"]
    assert zero["patients"] == 4 and zero["auroc"] == pytest.approx(direct["auroc"])
    assert results["main"]["EAG-RL"]["tjh"]["patients"] == 8
