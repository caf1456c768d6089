"""The whole pipeline (``make reproduce``'s driver) with the tiny random model on a few patients per
dataset: every stage runs, the report has every table, row and column, each number comes from the run
directories of this run, and a second call skips every finished stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eagrl.evaluation.report import ABLATIONS, COLUMNS, MAIN, ROBUST_METHODS, WINDOW_NOT_APPLICABLE, WINDOW_ROW
from eagrl.errors import EAGRLInputError
from eagrl.pipeline import Plan, main, select_stages


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
    for plot in ("roc_pr_tjh.png", "robustness.png", "cross_dataset.png", "rl_curves_tjh.png", "rl_curves_synthetic.png"):
        assert (results / plot).is_file(), plot
    assert "## Mechanism check: the synthetic cohort" in text and report["synthetic"]["expert"] is not None
    assert report["stage1"]["tjh"]["patients_searched"] >= 1

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


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["cpu", "quick", "smoke"])
def test_every_stage_command_of_the_plan_parses(profile, tmp_path, capsys, monkeypatch):
    import yaml

    from eagrl.cli import main as cli

    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    configs = {}
    for stage in Plan(profile, tmp_path).stages:
        with pytest.raises(SystemExit) as stop:
            cli([*stage.args, "--print_config"])
        captured = capsys.readouterr()
        assert not stop.value.code, (stage.name, captured.err[-1500:])
        configs[stage.name] = yaml.safe_load(captured.out)
    if profile != "cpu":
        return
    # PROFILE=cpu: the sizes that let the table tell the methods apart
    data = lambda name: configs[name]["data"]["init_args"]  # noqa: E731
    main_llm = [n for n in configs if n.startswith("tjh/") and n.split("/")[1] in {"prompting_vanilla", "prompting_think", "prompting_decomposition", "sft", "rl_grpo", "rl_dapo", "rl"}]
    assert len(main_llm) == 7 and all(data(n)["eval_patients"] is None for n in main_llm)  # the whole TJH test split
    subset = [n for n in configs if n.startswith(("tjh/robust/", "cross/")) or n in ("tjh/rl_no_att", "tjh/rl_no_entropy", "tjh/rl_no_stage1")]
    assert len(subset) == 14 and {data(n)["eval_patients"] for n in subset} == {100}  # one fixed balanced subset
    rl = [n for n in configs if configs[n]["model"]["class_path"].endswith("RLModule")]
    assert {configs[n]["model"]["init_args"]["max_generated_tokens"] for n in rl if not n.startswith("synthetic/")} == {24000}  # one budget for every variant
    assert {configs[n]["model"]["init_args"]["max_generated_tokens"] for n in rl if n.startswith("synthetic/")} == {12000}
    assert all(configs[n]["model"]["init_args"]["mini_batch_size"] < data(n)["batch_size"] * configs[n]["model"]["init_args"]["group_size"] for n in rl)
    distill = configs["tjh/distill"]
    assert distill["trainer"]["limit_predict_batches"] == 1.0 and data("tjh/distill")["predict_splits"] == ["train", "val"]
    assert configs["tjh/sft"]["trainer"]["limit_train_batches"] == 1.0 and configs["tjh/sft"]["trainer"]["max_epochs"] >= 1
    assert [n for n in configs if n.startswith("synthetic/")] == [f"synthetic/{s}" for s in ("concare", "prompting_decomposition", "distill", "sft", "rl_grpo", "rl")]
    assert all(data(n)["dataset"] == "synthetic" for n in configs if n.startswith("synthetic/"))


def test_a_half_written_distillation_is_not_done(tmp_path):
    """A search killed mid-way leaves trajectories.jsonl behind; the stage is done only once metrics.json (written at
    the end of predict) is there too, so a resumed pipeline finishes the search instead of fine-tuning on part of it."""
    stage = next(s for s in Plan("smoke", tmp_path).stages if s.name == "tjh/distill")
    expert, (trajectories, metrics) = stage.inputs[0], stage.outputs
    for path in (expert, trajectories):
        path.parent.mkdir(parents=True, exist_ok=True)
    expert.write_text("")
    trajectories.write_text('{"id": "1"}\n')
    assert not stage.done()
    metrics.write_text("{}")
    assert stage.done()


def test_answers_read_before_answer_reading_existed_are_not_done(tmp_path):
    """A prompting run whose config predates ``answer_reading`` read ŷ the older way (the last number anywhere):
    a resumed pipeline answers again instead of keeping it; the same run with the key, or a token-probability
    scorer, is done."""
    stage = next(s for s in Plan("smoke", tmp_path).stages if s.name == "tjh/prompting_decomposition")
    (expert,), (metrics,) = stage.inputs, stage.outputs
    for path in (expert, metrics):
        path.parent.mkdir(parents=True, exist_ok=True)
    expert.write_text("")
    metrics.write_text("{}")
    (metrics.parent / "generations.jsonl").write_text("{}\n")
    config = metrics.parent / "config.yaml"
    config.write_text("model:\n  init_args:\n    scorer: parse\n")
    assert not stage.done()
    config.write_text("model:\n  init_args:\n    scorer: token_probability\n")
    assert stage.done()
    config.write_text("model:\n  init_args:\n    scorer: parse\n    answer_reading: final_answer\n")
    assert stage.done()


def test_only_names_one_stage_or_a_prefix(tmp_path):
    """``--only tjh/rl`` is EAG-RL alone (not GRPO, DAPO and the ablations, whose names start with it); a prefix that is
    no stage's name selects every stage under it."""
    stages = Plan("cpu", tmp_path).stages
    names = lambda only: [s.name for s in select_stages(stages, only)]  # noqa: E731
    assert names("tjh/rl") == ["tjh/rl"]
    assert set(names("tjh/rl_")) == {"tjh/rl_grpo", "tjh/rl_dapo", "tjh/rl_no_att", "tjh/rl_no_entropy", "tjh/rl_no_stage1"}
    assert names("tjh/robust") == [s.name for s in stages if s.name.startswith("tjh/robust/")]
    assert names(None) == [s.name for s in stages]
    with pytest.raises(EAGRLInputError, match="--only tjh/rll"):
        names("tjh/rll")  # a typo is an error, not a run of nothing


def test_a_fit_stopped_inside_its_stage_resumes_from_its_last_checkpoint(tmp_path, capsys, monkeypatch):
    """An RL stage killed mid-fit leaves checkpoints/last.ckpt (one per rollout): rerunning the pipeline resumes from
    it (``--ckpt_path``) instead of starting over, unless an input changed after it (another run's checkpoint); a
    stage that is not a fit never resumes."""
    import os

    plan = Plan("smoke", tmp_path)
    stage = next(s for s in plan.stages if s.name == "tjh/rl")
    for path in stage.inputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert stage.checkpoint() is None and "--ckpt_path" not in stage.command()
    last = Path(stage.args[stage.args.index("--trainer.default_root_dir") + 1]) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"checkpoint")
    assert stage.command()[-2:] == ["--ckpt_path", str(last)] and stage.command()[:-2] == stage.args
    main(["--profile", "smoke", "--runs", str(tmp_path), "--list"])
    assert "to do  tjh/rl  (resumes from its checkpoints/last.ckpt)" in capsys.readouterr().out.splitlines()
    ran = []
    monkeypatch.setattr("eagrl.pipeline._run_in_process", lambda name, args: ran.append((name, args)))
    from eagrl.pipeline import run

    run(plan, in_process=True, only="tjh/rl")  # what the pipeline runs
    assert ran == [("tjh/rl", [*stage.args, "--ckpt_path", str(last)])]
    newer = last.stat().st_mtime + 10
    os.utime(stage.inputs[0], (newer, newer))  # the SFT model was retrained since: the checkpoint is another run's
    assert stage.checkpoint() is None and "--ckpt_path" not in stage.command()
    prompting = next(s for s in plan.stages if s.name == "tjh/prompting_decomposition")
    assert prompting.checkpoint() is None


def test_a_run_folder_made_with_other_settings_is_neither_done_nor_resumed_and_moves_aside(tmp_path, capsys, monkeypatch):
    """``make reproduce PROFILE=quick`` then ``make reproduce`` into one runs folder: the quick run's outputs are newer
    than every input and config, so by file times alone the cpu stage would be "done" (its report the quick sizes')
    or resume from the quick run's checkpoint. The recorded command tells them apart: the stage runs, in a fresh
    folder; the quick run's moves to ``<runs>.replaced/1/`` (kept, outside the runs the report reads). The same
    command, or the same runs moved elsewhere, is still done; a folder without a record keeps the file-time rule."""
    import shutil

    from eagrl.pipeline import run

    runs = tmp_path / "runs"
    quick = next(s for s in Plan("quick", runs).stages if s.name == "tjh/rl")
    cpu_plan = Plan("cpu", runs)
    cpu = next(s for s in cpu_plan.stages if s.name == "tjh/rl")
    assert quick.run_dir == cpu.run_dir and quick.signature != cpu.signature
    for path in cpu.inputs:  # the SFT model and the expert, older than the runs below
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    ran = []
    monkeypatch.setattr("eagrl.pipeline._run_in_process", lambda name, args: ran.append(args))

    def finish(stage):  # what a fit leaves behind
        for path in stage.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        last = stage.run_dir / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True, exist_ok=True)
        last.write_bytes(b"checkpoint")

    run(Plan("quick", runs), in_process=True, only="tjh/rl")
    finish(quick)
    assert quick.done() and json.loads((quick.run_dir / "pipeline_stage.json").read_text())["args"] == quick.signature
    assert not cpu.done() and cpu.checkpoint() is None  # the quick run's outputs and checkpoint are not the cpu stage's
    main(["--profile", "cpu", "--runs", str(runs), "--list"])
    assert "to do  tjh/rl  (its run folder was made with other settings: moved aside when it runs)" in capsys.readouterr().out.splitlines()
    run(cpu_plan, in_process=True, only="tjh/rl")
    assert ran[-1] == cpu.args  # started over: no --ckpt_path
    moved = tmp_path / "runs.replaced" / "1" / "tjh" / "rl"
    assert (moved / "metrics.json").is_file() and (moved / "checkpoints" / "last.ckpt").is_file()
    assert not (cpu.run_dir / "metrics.json").exists() and not (cpu.run_dir / "checkpoints").exists()
    assert "moved to" in capsys.readouterr().out
    finish(cpu)
    assert cpu.done() and not quick.done()
    # --only a later stage over an input another profile made: an error naming the stage to run first
    sft = next(s for s in Plan("quick", runs).stages if s.name == "tjh/sft")
    sft.prepare()
    with pytest.raises(EAGRLInputError, match=r"needs .*merged/config.json, which stage tjh/sft makes with this profile's settings"):
        run(Plan("cpu", runs), in_process=True, only="tjh/rl_grpo")
    # the same command over the same runs moved to another folder: still done (the record names the runs folder "<runs>")
    shutil.copytree(runs, tmp_path / "elsewhere", symlinks=True)
    assert next(s for s in Plan("cpu", tmp_path / "elsewhere").stages if s.name == "tjh/rl").done()
    # a folder written before records existed: the file times alone, as before
    (cpu.run_dir / "pipeline_stage.json").unlink()
    assert cpu.done() and quick.done()


def test_seed_folders_another_command_made_move_aside_before_the_report(tmp_path):
    """``PROFILE=quick SEEDS="0 1"``, then ``make reproduce`` (seed 0 only): the quick run's ``<variant>_seed1``
    folders are no stage of the plan, but the report reads every seed folder; they move aside before it. Seed folders
    of this profile's own earlier ``SEEDS="0 1"`` run stay, reported."""
    from eagrl.pipeline import retire_other_seeds

    runs = tmp_path / "runs"
    quick_seed = next(s for s in Plan("quick", runs, seeds=(0, 1)).stages if s.name == "tjh/rl_seed1")
    own_seed = next(s for s in Plan("cpu", runs, seeds=(0, 1)).stages if s.name == "tjh/rl_grpo_seed1")
    for stage in (quick_seed, own_seed):
        stage.prepare()
        (stage.run_dir / "metrics.json").write_text("{}")
    assert retire_other_seeds(Plan("cpu", runs)) == [tmp_path / "runs.replaced" / "1" / "tjh" / "rl_seed1"]
    assert not quick_seed.run_dir.exists() and (own_seed.run_dir / "metrics.json").is_file()
    assert retire_other_seeds(Plan("cpu", runs)) == []


def test_a_relative_runs_folder_given_outside_the_repository_is_where_the_stages_write(tmp_path, monkeypatch):
    """The stages run in the repository root: ``--runs r`` from another folder means that folder's ``r`` for the
    pipeline's checks and for the stages alike; from the root it stays relative (short printed commands)."""
    from eagrl.paths import REPO_ROOT
    from eagrl.pipeline import runs_folder

    monkeypatch.chdir(tmp_path)
    assert runs_folder(Path("r")) == tmp_path.resolve() / "r"
    stage = next(s for s in Plan("smoke", runs_folder(Path("r"))).stages if s.name == "tjh/concare")
    assert Path(stage.args[stage.args.index("--trainer.default_root_dir") + 1]).is_absolute()
    monkeypatch.chdir(REPO_ROOT)
    assert runs_folder(Path("runs")) == Path("runs")
    assert runs_folder(tmp_path / "x" / ".." / "r") == tmp_path.resolve() / "r"
