"""The whole pipeline (``make reproduce``'s driver) with the tiny random model on a few patients per
dataset: every stage runs, the report has every table, row and column, each number comes from the run
directories of this run, and a second call skips every finished stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eagrl.evaluation.report import ABLATIONS, COLUMNS, MAIN, ROBUST_METHODS, WINDOW_NOT_APPLICABLE, WINDOW_ROW
from eagrl.pipeline import Plan, main


@pytest.mark.slow
def test_whole_pipeline_with_a_tiny_model(tmp_path, session_cache, monkeypatch, capsys):
    monkeypatch.setenv("EAGRL_CACHE_DIR", str(session_cache))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the RL loss on its PyTorch path (the kernel has its own tests)
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    runs, results = tmp_path / "runs", tmp_path / "results"
    main(["--profile", "smoke", "--runs", str(runs), "--results", str(results), "--in-process"])
    plan = Plan("smoke", runs)
    for stage in plan.stages:
        assert stage.done(), stage.name

    report = json.loads((results / "results.json").read_text())
    text = (results / "results.md").read_text()
    for row, name in MAIN:
        for key, title, folder, suffix in COLUMNS:
            if row == WINDOW_ROW and key in WINDOW_NOT_APPLICABLE:
                assert report["main"][row][key] is None
                continue
            cell = report["main"][row][key]
            metrics = json.loads((runs / folder / f"{name}{suffix}" / "metrics.json").read_text())
            assert cell is not None and cell["auroc"] == metrics.get("test/auroc"), (row, key)
        assert f"| {row} |" in text
    for row, _ in ABLATIONS:
        assert report["ablation"][row] is not None, row
    for row, _ in ROBUST_METHODS:
        assert all(report["robustness"][row][p] is not None for p in report["robustness"][row]), row
    assert all(report["cross_dataset"].values())
    for _, title, _, _ in COLUMNS:
        assert f"{title} AUROC" in text
    numbers = set(re.findall(r"\d+\.\d\d ± \d+\.\d\d", text))
    assert numbers  # the figures are read from this run's metrics files (checked cell by cell above)
    for plot in ("roc_pr_tjh.png", "robustness.png", "cross_dataset.png", "rl_curves_tjh.png"):
        assert (results / plot).is_file(), plot

    capsys.readouterr()
    main(["--profile", "smoke", "--runs", str(runs), "--results", str(results), "--in-process"])
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(plan.stages)  # a rerun resumes: nothing is redone


def test_a_missing_input_names_the_stage_that_makes_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "smoke", "--runs", str(tmp_path), "--only", "tjh/sft", "--in-process"])
    assert "stage tjh/sft needs" in str(stop.value) and "which stage tjh/distill makes" in str(stop.value)


def test_paper_profile_without_a_gpu_or_model_stops_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--profile", "paper", "--runs", str(tmp_path), "--model", "/nowhere"])
    assert not any(Path(tmp_path).iterdir())


@pytest.mark.parametrize("profile", ["cpu", "smoke"])
def test_every_stage_command_of_the_plan_parses(profile, tmp_path, capsys, monkeypatch):
    from eagrl.cli import main as cli

    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    for stage in Plan(profile, tmp_path).stages:
        with pytest.raises(SystemExit) as stop:
            cli([*stage.args, "--print_config"])
        err = capsys.readouterr().err
        assert not stop.value.code, (stage.name, err[-1500:])
