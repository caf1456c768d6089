"""The ``python -m eagrl`` command line: help, summaries, config validation, and ConCare fits end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eagrl.cli import main
from tests.conftest import REPO, run_cli

OVERLAY_DIRS = ("smoke", "rl", "reproduce", "sweeps", "scale", "windows", "synthetic")  # overlays and sweeps: parsed on top of a full config elsewhere
CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml") if not set(OVERLAY_DIRS) & set(p.relative_to(REPO).parts[1:-1]))
DATA_CONFIGS = [c for c in CONFIGS if c.endswith("_data.yaml") or c.endswith("/data.yaml")]
SMOKE = ["--config", "configs/smoke/concare.yaml"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])  # the CLI runs in-process with its own args


def _main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out = capsys.readouterr()
    return stop.value.code or 0, out.out, out.err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    for subcommand in ("fit", "validate", "test", "predict", "summary"):
        assert subcommand in out


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(capsys, config):
    subcommand = "summary" if config in DATA_CONFIGS else "fit"
    code, out, err = _main(capsys, subcommand, "--config", config, "--print_config")
    assert code == 0, err
    assert "class_path: datamodules." in out
    if config not in DATA_CONFIGS:
        assert "class_path: lightning_modules." in out


def test_interpolation_follows_the_run_directory(capsys):
    _, out, _ = _main(capsys, "fit", "--config", "configs/tjh/concare.yaml", "--trainer.default_root_dir", "/x/run", "--print_config")
    assert "dirpath: /x/run/checkpoints" in out and "save_dir: /x/run" in out


@pytest.mark.parametrize(
    "args, named",
    [
        (["fit", "--config", "configs/tjh/concare.yaml", "--model.init_args.hidden", "-3"], "hidden"),
        (["fit", "--config", "configs/tjh/concare.yaml", "--trainer.max_epoch", "3"], "max_epoch"),
        (["summary", "--config", "configs/tjh/data.yaml", "--data.init_args.dataset", "eicu"], "dataset"),
        (["summary", "--config", "configs/tjh/data.yaml", "--data.init_args.task", "readmission"], "task"),
    ],
)
def test_bad_config_stops_at_start_up_naming_the_key(capsys, args, named):
    # the whole bad-input matrix (with the no-overwrite check) is tests/integration/test_bad_input.py
    code, _, err = _main(capsys, *args)
    assert code == 2
    assert err.startswith("error:") and named in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("config", DATA_CONFIGS)
def test_summary_prints_the_cohort_as_json(config, session_cache):
    # the first config through a new `python -m eagrl` process (the entry point itself), the others in this one
    result = run_cli("summary", "--config", config, cache=session_cache, fresh_process=config == DATA_CONFIGS[0])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"dataset", "task", "features", "feature_names", "splits", "observation_window", "excluded_by_cause", "split_file"} <= set(summary)
    assert summary["features"] == len(summary["feature_names"])
    assert set(summary["splits"]) == {"train", "val", "test"}
    if summary["dataset"] == "tjh":
        assert summary["features"] == 75
        assert {s: (v["patients"], v["positives"]) for s, v in summary["splits"].items()} == {
            "train": (139, 64),
            "val": (21, 10),
            "test": (199, 90),
        }  # the published 140 / 21 / 200, less the two patients whose every record is after discharge
    else:
        assert summary["features"] == 19  # 17 clinical variables + sex + age
        assert sum(v["patients"] for v in summary["splits"].values()) == 100  # the demo's 100 patients
    tokens = summary["prompt_tokens"]  # on the embedded SmolLM2 tokenizer (the default), decomposition prompts
    assert tokens["tokenizer"] == "embedded" and tokens["prompt_style"] == "decomposition" and tokens["text_style"] == "paper"
    for split in ("train", "val", "test"):
        row = tokens["splits"][split]
        assert 100 < row["median"] <= row["p90"] <= row["max"]


@pytest.mark.slow
def test_summary_counts_prompt_tokens_of_the_configured_text_style(session_cache):
    result = run_cli("summary", "--config", "configs/tjh/data.yaml", "--data.init_args.text_style", "compact", cache=session_cache)
    assert result.returncode == 0, result.stderr
    tokens = json.loads(result.stdout)["prompt_tokens"]
    assert tokens["text_style"] == "compact"
    assert tokens["splits"]["test"]["median"] < 1400  # the paper style's TJH test median is ~2,950
    result = run_cli("summary", "--config", "configs/tjh/data.yaml", "--tokenizer", "none", cache=session_cache)
    assert result.returncode == 0 and "prompt_tokens" not in json.loads(result.stdout)


@pytest.mark.parametrize(
    "configs, window",
    [
        (["configs/tjh/data.yaml", "configs/windows/tjh_2days.yaml"], {"observation_days": 2, "from": "the first record (day 1)"}),
        (["configs/mimic_iv/mortality_data.yaml", "configs/windows/mimic_iv_48h.yaml"], {"observation_hours": 48.0, "from": "ICU intime"}),
    ],
)
@pytest.mark.slow
def test_the_window_overlays_give_a_windowed_summary(configs, window, session_cache):
    result = run_cli("summary", *[a for c in configs for a in ("--config", c)], "--tokenizer", "none", cache=session_cache)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["observation_window"] == window
    for split in summary["splits"].values():  # every sample before the rules is kept or excluded for a counted cause
        assert split["before_exclusions"] == split["samples"] + sum(split["excluded"].values())
    assert sum(summary["excluded_by_cause"].values()) > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, session_cache) -> Path:
    """A 2-epoch ConCare fit on TJH through the real CLI."""
    root = tmp_path_factory.mktemp("concare-smoke")
    result = run_cli("fit", "--config", "configs/tjh/concare.yaml", *SMOKE, "--trainer.default_root_dir", str(root), cache=session_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_fit_leaves_the_run_bundle(smoke_run):
    for name in ("config.yaml", "metrics.json", "run_info.json", "expert_attention.jsonl", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (smoke_run / name).is_file(), name
    assert "default_root_dir: " + str(smoke_run) in (smoke_run / "config.yaml").read_text()
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("auroc", "auprc", "f1", "accuracy"):
            assert 0.0 <= metrics[f"{split}/{name}"] <= 1.0
            assert metrics[f"{split}/{name}_std"] >= 0.0
    info = json.loads((smoke_run / "run_info.json").read_text())
    assert info["seed"] == 42 and "torch" in info["versions"]


@pytest.mark.slow
def test_subgroup_metrics_of_a_fit_equal_a_direct_computation(smoke_run, tjh_module):
    from eagrl.evaluation.metrics import SUBGROUPS, binary_metrics

    metrics = json.loads((smoke_run / "metrics.json").read_text())
    test = tjh_module.datasets["test"]
    by_id = {r["id"]: r for r in map(json.loads, (smoke_run / "expert_attention.jsonl").read_text().splitlines()) if r["split"] == "test"}
    probs = torch.tensor([by_id[i]["prob"] for i in test.ids], dtype=torch.double)
    labels = torch.tensor([by_id[i]["label"] for i in test.ids])
    sex, age = (torch.from_numpy(v) for v in test.sex_age(range(len(test))))
    groups = {"sex_male": sex == 1, "sex_female": sex == 0, "age_lt50": age < 50, "age_50_70": (age >= 50) & (age <= 70), "age_gt70": age > 70}
    assert int(groups["sex_male"].sum() + groups["sex_female"].sum()) == len(test)  # TJH records every sex
    for key, _ in SUBGROUPS:
        mask = groups[key]
        assert metrics[f"test/subgroup_{key}_patients"] == int(mask.sum())
        assert metrics[f"test/subgroup_{key}_positives"] == int(labels[mask].sum())
        if min(int(labels[mask].sum()), int((1 - labels[mask]).sum())) >= 10:
            # the export's ŷ come from its own forward pass (other batches, 6 decimals): equal to ~1e-4
            assert metrics[f"test/subgroup_{key}_auroc"] == pytest.approx(binary_metrics(probs[mask], labels[mask])["auroc"], abs=2e-3)
        else:
            assert f"test/subgroup_{key}_auroc" not in metrics  # too small for a number
    assert any(f"test/subgroup_{key}_auroc" in metrics for key, _ in SUBGROUPS)
    assert any(f"test/subgroup_{key}_auroc" not in metrics for key, _ in SUBGROUPS)  # TJH's under-50s: few deaths


@pytest.mark.slow
def test_expert_attention_export(smoke_run, tjh_module):
    lines = (smoke_run / "expert_attention.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    sizes = {s: len(tjh_module.datasets[s]) for s in ("train", "val", "test")}
    assert len(records) == sum(sizes.values()) == 359  # 361 with a dated record, 2 with every record after discharge
    assert {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")} == sizes == {"train": 139, "val": 21, "test": 199}
    assert len({r["id"] for r in records}) == len(records)
    raw = tjh_module.cohort.raw
    row_of = {sample: k for k, sample in enumerate(raw.sample_ids)}
    names = raw.feature_names
    for record in records:
        assert set(record) == {"id", "split", "label", "prob", "features", "top_k"}
        weights = [w for _, w in record["features"]]
        assert weights == sorted(weights, reverse=True)
        values = raw.values[raw.rows(row_of[record["id"]])]  # [T, F] raw, NaN = not measured
        measured = {names[j] for j in range(2, len(names)) if not np.isnan(values[:, j]).all()}
        assert {n for n, _ in record["features"]} == measured  # only what the patient had measured is ranked
        assert record["top_k"] == [n for n, _ in record["features"][:5]]
        assert record["label"] in (0, 1) and 0.0 <= record["prob"] <= 1.0
    mask = json.loads((smoke_run / "expert_attention_mask.json").read_text())
    assert mask["patients"] == 359 and 0.0 <= mask["fraction_of_top_k_slots_never_measured"] <= 1.0
    assert mask["fraction_of_patients_changed"] > 0  # TJH is 56% missing: an unmasked top-5 names unmeasured labs


@pytest.mark.slow
def test_resume_from_last_continues_with_the_optimiser_state(smoke_run, session_cache):
    first = torch.load(smoke_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    steps_per_epoch = 5  # 140 training patients, batch 32
    assert first["epoch"] == 1 and first["global_step"] == 2 * steps_per_epoch
    result = run_cli(
        "fit", "--config", "configs/tjh/concare.yaml", *SMOKE, "--trainer.max_epochs", "3",
        "--trainer.default_root_dir", str(smoke_run), "--ckpt_path", "last", cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in result.stderr + result.stdout
    second = torch.load(smoke_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert second["epoch"] == 2 and second["global_step"] == 3 * steps_per_epoch
    adam_steps = {float(state["step"]) for state in second["optimizer_states"][0]["state"].values()}
    assert adam_steps == {3.0 * steps_per_epoch}  # the optimiser state went on from the saved one


@pytest.mark.slow
def test_test_subcommand_with_a_checkpoint(smoke_run, session_cache, tmp_path):
    result = run_cli(
        "test", "--config", "configs/tjh/concare.yaml", *SMOKE, "--trainer.default_root_dir", str(tmp_path),
        "--ckpt_path", str(smoke_run / "checkpoints/best.ckpt"), cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.5 < metrics["test/auroc"] <= 1.0
    assert len((tmp_path / "expert_attention.jsonl").read_text().splitlines()) == 359


@pytest.mark.slow
def test_a_checkpoint_of_another_dataset_is_refused(smoke_run, session_cache, tmp_path):
    result = run_cli(
        "test", "--config", "configs/mimic_iv/concare_mortality.yaml", *SMOKE, "--trainer.default_root_dir", str(tmp_path),
        "--ckpt_path", str(smoke_run / "checkpoints/best.ckpt"), cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 2
    assert "was trained on 73 features, this data has 17: features missing from" in result.stderr


@pytest.mark.slow
def test_mimic_readmission_smoke_fit(session_cache, tmp_path):
    result = run_cli(
        "fit", "--config", "configs/mimic_iv/concare_readmission.yaml", *SMOKE, "--trainer.default_root_dir", str(tmp_path),
        cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "test/auroc" in metrics and "test/auprc_std" in metrics
    records = [json.loads(line) for line in (tmp_path / "expert_attention.jsonl").read_text().splitlines()]
    assert len(records) == 140 and all(len(r["features"]) <= 17 for r in records)  # one line per ICU stay


@pytest.mark.slow
def test_tjh_concare_reaches_the_quality_bar(session_cache, tmp_path):
    """The shipped config on the published TJH split: test AUROC and AUPRC >= 0.90 (issue 3)."""
    result = run_cli("fit", "--config", "configs/tjh/concare.yaml", "--trainer.default_root_dir", str(tmp_path), cache=session_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/auroc"] >= 0.90 and metrics["test/auprc"] >= 0.90


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory, session_cache) -> Path:
    """A ConCare smoke fit on Yan et al.'s three TJH labs (written as aliases) through the real CLI."""
    root = tmp_path_factory.mktemp("concare-subset")
    result = run_cli("fit", "--config", "configs/tjh/concare.yaml", *SMOKE, "--data.init_args.features", '["LDH", "hs-CRP", "lymphocyte %"]',
                     "--trainer.default_root_dir", str(root), cache=session_cache)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_a_feature_subset_fit_follows_the_named_labs(subset_run):
    """ConCare, its checkpoint and the expert export use only the named labs."""
    wanted = ["Lactate dehydrogenase", "High sensitivity C-reactive protein", "(%)lymphocyte"]  # beside Sex and Age
    hparams = torch.load(subset_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert sorted(hparams["feature_names"]) == sorted(wanted) and hparams["n_demographic"] == 2
    records = [json.loads(line) for line in (subset_run / "expert_attention.jsonl").read_text().splitlines()]
    assert {name for r in records for name, _ in r["features"]} == set(wanted)
    assert 0.0 <= json.loads((subset_run / "metrics.json").read_text())["test/auroc"] <= 1.0


def _external_cohort(path: Path, ldh_scale: float = 1.0, patients: int = 40) -> Path:
    """Another hospital's cohort, made up by code (no patient of any dataset): only three labs, no age or sex, no
    discharge time, day-first dates. LDH, hs-CRP and lymphocyte % separate the outcomes, as in TJH."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for p in range(patients):
        died = p % 2
        for day in range(1 + p % 3):
            rows.append({
                "PATIENT_ID": 1000 + p, "RE_DATE": f"{3 + day:02d}.02.2020 {8 + p % 10}:15", "outcome": died,
                "Lactate dehydrogenase": ldh_scale * rng.normal(650 if died else 220, 40),
                "High sensitivity C-reactive protein": rng.normal(120 if died else 5, 3),
                "(%)lymphocyte": rng.normal(4 if died else 28, 2),
            })  # fmt: skip
    pd.DataFrame(rows).to_excel(path, index=False)
    return path


@pytest.mark.slow
def test_an_external_cohort_with_three_labs_is_scored_by_a_checkpoint(subset_run, session_cache, tmp_path):
    """External validation (issue 18): a spreadsheet with three labs, no age or sex and other dates, under
    ``split: all``, normalised with the checkpoint's training statistics."""
    cohort = _external_cohort(tmp_path / "other_hospital.xlsx")
    args = ["--config", "configs/tjh/concare.yaml", *SMOKE, "--data.init_args.features", '["LDH", "hs-CRP", "lymphocyte %"]',
            "--data.init_args.cohort_file", str(cohort), "--data.init_args.date_format", "%d.%m.%Y %H:%M", "--data.init_args.split", "all"]  # fmt: skip
    ckpt = ["--ckpt_path", str(subset_run / "checkpoints" / "best.ckpt")]
    refused = run_cli("test", *args, *ckpt, "--trainer.default_root_dir", str(tmp_path / "refused"), cache=session_cache)
    assert refused.returncode == 2 and "missing feature column(s) ['gender', 'age']" in refused.stderr
    assert "allow_missing_features" in refused.stderr and "Traceback" not in refused.stderr

    args += ["--data.init_args.allow_missing_features", "true"]
    result = run_cli("test", *args, *ckpt, "--trainer.default_root_dir", str(tmp_path / "scored"), cache=session_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the cohort lacks 2 of the model's 5 features (Sex, Age)" in result.stderr and "60%" in result.stderr
    assert "has median" not in result.stderr  # same units: no unit warning
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert metrics["data/absent_features"] == ["Sex", "Age"] and metrics["data/features_present"] == pytest.approx(0.6)
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    assert len((tmp_path / "scored" / "expert_attention.jsonl").read_text().splitlines()) == 40  # every patient is a test patient

    summary = run_cli("summary", *args, cache=session_cache)
    assert summary.returncode == 0, summary.stderr[-3000:]
    printed = json.loads(summary.stdout)
    assert printed["splits"]["test"]["patients"] == 40 and printed["splits"]["train"]["patients"] == 0
    assert printed["post_discharge_rule"] == "skipped: the file has no 'Discharge time' column"

    state = torch.load(subset_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    stats = state["EHRDataModule"]["training_statistics"]
    assert sorted(stats["features"]) == sorted(["Sex", "Age", "(%)lymphocyte", "Lactate dehydrogenase", "High sensitivity C-reactive protein"])
    assert len(stats["mean"]) == len(stats["std"]) == len(stats["median"]) == 5
    del state["EHRDataModule"]  # a checkpoint saved before the statistics were kept
    torch.save(state, tmp_path / "old.ckpt")
    old = run_cli("test", *args, "--ckpt_path", str(tmp_path / "old.ckpt"), "--trainer.default_root_dir", str(tmp_path / "old"), cache=session_cache)
    assert old.returncode == 2 and "this checkpoint does not hold them" in old.stderr and "Traceback" not in old.stderr

    other_units = _external_cohort(tmp_path / "other_units.xlsx", ldh_scale=1 / 60)  # e.g. µkat/L instead of U/L
    swapped = [a if a != str(cohort) else str(other_units) for a in args]
    warned = run_cli("test", *swapped, *ckpt, "--trainer.default_root_dir", str(tmp_path / "units"), cache=session_cache)
    assert warned.returncode == 0, warned.stderr[-3000:]
    assert "feature 'Lactate dehydrogenase' has median" in warned.stderr and "check that its unit is U/L" in warned.stderr
    units = json.loads((tmp_path / "units" / "metrics.json").read_text())["data/unit_warnings"]
    assert len(units) == 1 and "Lactate dehydrogenase" in units[0]


def test_an_unknown_feature_name_lists_its_close_matches(capsys):
    code, _, err = _main(capsys, "fit", "--config", "configs/tjh/concare.yaml", "--data.init_args.features", '["LDH", "albumen"]')
    assert code == 2 and "Traceback" not in err
    assert "data.features: unknown feature name(s) for tjh: 'albumen'" in err and "albumin" in err
