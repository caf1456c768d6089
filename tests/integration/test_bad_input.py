"""The bad-input matrix, through the real CLI: one test per case. Each must exit non-zero with one clear
``error:`` line naming the problem (no traceback), and leave an earlier run's outputs in the run
directory exactly as they were."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from eagrl.cli import main
from tests.conftest import REPO

TJH_XLSX = "tjh/raw/time_series_375_prerpocess_en.xlsx"
TJH_SPLIT = "tjh/splits/tjh_clinicrealm_split_ids.csv"
CONCARE = ["fit", "--config", "configs/tjh/concare.yaml", "--config", "configs/smoke/concare.yaml"]
PROMPTING = ["test", "--config", "configs/tjh/prompting_vanilla.yaml", "--config", "configs/smoke/prompting.yaml"]
EARLIER = {  # what an earlier run left in the run directory
    "config.yaml": b"seed_everything: 1\n",
    "run_info.json": b'{"stage": "fit"}\n',
    "metrics.json": b'{"test/auroc": 0.9}\n',
    "expert_attention.jsonl": b'{"id": "earlier"}\n',
    "generations.jsonl": b'{"id": "earlier"}\n',
    "checkpoints/last.ckpt": b"an earlier checkpoint",
}


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored after the test


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    for rel, data in EARLIER.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _rewrite_xlsx(root: Path, edit) -> None:
    path = root / TJH_XLSX
    edit(pd.read_excel(path)).to_excel(path, index=False)


def refused(capsys, run_dir: Path, *args: str, named: str) -> None:
    """Run the CLI in-process on ``run_dir`` and check the refusal."""
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.default_root_dir", str(run_dir)] if args and args[0] != "fitt" else list(args))
    err = capsys.readouterr().err
    check_refusal(stop.value.code, err, run_dir, named)


def check_refusal(code, err: str, run_dir: Path, named: str) -> None:
    assert code not in (0, None), err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert named in err, err[-2000:]
    assert "Traceback" not in err
    for rel, data in EARLIER.items():
        assert (run_dir / rel).read_bytes() == data, f"{rel} was overwritten"


def _data(root: Path, cache: Path) -> list[str]:
    return ["--data.init_args.data_dir", str(root), "--data.init_args.cache_dir", str(cache)]


# --------------------------------------------------------------------------------------------- data
def test_missing_data_folder(capsys, run_dir, tmp_path):
    refused(capsys, run_dir, *CONCARE, *_data(tmp_path / "no-such-folder", tmp_path / "cache"), named="no-such-folder (from the config value data_dir) does not exist")


def test_a_spreadsheet_that_is_not_one(capsys, run_dir, tjh_copy, tmp_path):
    (tjh_copy / TJH_XLSX).write_text("PATIENT_ID,RE_DATE\n1,2020-01-01\n")
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="cannot be read as an xlsx")


def test_a_split_file_that_is_not_a_csv(capsys, run_dir, tjh_copy, tmp_path):
    (tjh_copy / TJH_SPLIT).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="tjh_clinicrealm_split_ids.csv")


@pytest.mark.slow
def test_a_missing_column(capsys, run_dir, tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.drop(columns=["outcome"]))
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="missing required column")


@pytest.mark.slow
def test_an_empty_cohort(capsys, run_dir, tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.assign(RE_DATE=pd.NaT))
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="cohort is empty")


@pytest.mark.slow
def test_a_label_that_is_not_0_or_1(capsys, run_dir, tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.assign(outcome=f["outcome"] * 3))
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="'outcome' must hold 0/1")


def test_a_split_file_id_that_is_not_in_the_cohort(capsys, run_dir, tjh_copy, tmp_path):
    with open(tjh_copy / TJH_SPLIT, "a") as handle:
        handle.write("9999,test\n")
    refused(capsys, run_dir, *CONCARE, *_data(tjh_copy, tmp_path / "cache"), named="not in the tjh cohort, e.g. '9999'")


def test_a_shuffled_feature_order_for_concare(capsys, run_dir):
    refused(capsys, run_dir, *CONCARE, "--data.init_args.shuffle_fraction", "0.4", named="ConCare reads one GRU per feature")


def test_a_window_with_the_readmission_task(capsys, run_dir):
    args = ["fit", "--config", "configs/mimic_iv/concare_readmission.yaml", "--config", "configs/windows/mimic_iv_48h.yaml"]
    refused(capsys, run_dir, *args, named="data.observation_hours: readmission is predicted at discharge")


# ------------------------------------------------------------------------------------------- config
def test_a_misspelt_config_key(capsys, run_dir):
    refused(capsys, run_dir, *CONCARE, "--model.init_args.hiddden", "8", named="hiddden")


def test_a_misspelt_key_inside_a_config_file(capsys, run_dir, tmp_path):
    text = (REPO / "configs/tjh/concare.yaml").read_text().replace("    decov_weight:", "    decov_wieght:")
    (tmp_path / "typo.yaml").write_text(text)
    refused(capsys, run_dir, "fit", "--config", str(tmp_path / "typo.yaml"), named="decov_wieght")


def test_a_wrong_type(capsys, run_dir):
    refused(capsys, run_dir, *CONCARE, "--model.init_args.hidden", "many", named="hidden")


def test_an_unknown_subcommand(capsys, run_dir):
    refused(capsys, run_dir, "fitt", "--config", "configs/tjh/concare.yaml", named="fitt")


def test_a_zero_count(capsys, run_dir):
    refused(capsys, run_dir, *CONCARE, "--data.init_args.batch_size", "0", named="batch_size")


def test_a_negative_count(capsys, run_dir):
    refused(capsys, run_dir, *CONCARE, "--model.init_args.n_bootstrap", "-5", named="n_bootstrap")


# ------------------------------------------------------------------------------------ model, expert
@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _prompting(model_cache: Path, expert: Path, *extra: str) -> list[str]:
    return [*PROMPTING, "--model.init_args.backbone.cache_dir", str(model_cache), "--model.init_args.expert_attention", str(expert), *extra]


def test_a_model_path_that_does_not_exist(capsys, run_dir, tmp_path, model_cache, tjh_expert):
    args = _prompting(model_cache, tjh_expert, "--model.init_args.backbone.name", str(tmp_path / "no-model"))
    refused(capsys, run_dir, *args, named="no-model does not exist")


@pytest.mark.slow
def test_a_corrupted_safetensors_file(capsys, run_dir, tmp_path, model_cache, tjh_expert):
    from eagrl.models.backbone import BackboneOptions, embedded_tokenizer, tiny_random_llama

    folder = tmp_path / "model"
    tokenizer = embedded_tokenizer(BackboneOptions(cache_dir=str(model_cache)))
    tiny_random_llama(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    args = _prompting(model_cache, tjh_expert, "--model.init_args.backbone.name", str(folder))
    refused(capsys, run_dir, *args, named="model.safetensors is not a complete safetensors file")


@pytest.mark.slow
def test_a_corrupted_gguf_file(run_dir, tmp_path, session_cache, tjh_expert):
    """The embedded model package damaged on disk: its GGUF is cut short (an installed package shadows it)."""
    from eagrl.models.backbone import GGUF_FILE, GGUF_PACKAGE, embedded_gguf

    package = tmp_path / "site" / GGUF_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    with open(embedded_gguf(), "rb") as handle:
        (package / GGUF_FILE).write_bytes(handle.read(4 << 20))
    args = _prompting(tmp_path / "empty-model-cache", tjh_expert, "--model.init_args.backbone.name", "embedded:smollm2-135m-instruct")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "EAGRL_CACHE_DIR": str(session_cache)}
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "eagrl", *args, "--trainer.default_root_dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    check_refusal(result.returncode, result.stderr, run_dir, named="is not a complete GGUF file")


def test_an_expert_file_of_another_dataset(capsys, run_dir, tmp_path, model_cache):
    from eagrl.data.features import DATASET_FEATURES

    other = tmp_path / "mimic_expert_attention.jsonl"  # the format of a MIMIC-IV export, with made-up ids
    names = [feature.name for feature in DATASET_FEATURES["mimic_iv"]][:5]
    record = {"id": "made-up-1", "split": "test", "label": 0, "prob": 0.1, "features": [[n, 0.2] for n in names], "top_k": names}
    other.write_text(json.dumps(record) + "\n")
    refused(capsys, run_dir, *_prompting(model_cache, other), named="are not in this dataset")


def test_distillation_never_searches_test_patients(capsys, run_dir, model_cache, tjh_expert):
    args = ["predict", "--config", "configs/tjh/distill.yaml", "--config", "configs/smoke/distill.yaml",
            "--model.init_args.backbone.cache_dir", str(model_cache), "--model.init_args.expert_attention", str(tjh_expert),
            "--data.init_args.predict_splits", "[train, test]"]  # fmt: skip
    refused(capsys, run_dir, *args, named="data.init_args.predict_splits: distillation reads each patient's label")


# ---------------------------------------------------------------------------------------- scale-out
RL = ["fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/smoke/rl.yaml"]
SFT_FSDP = ["fit", "--config", "configs/tjh/sft_paper.yaml", "--config", "configs/scale/sft_fsdp.yaml"]


def test_a_strategy_the_stage_does_not_support(capsys, run_dir):
    refused(capsys, run_dir, *RL, "--trainer.strategy", "fsdp", named="RLModule does not run under 'fsdp'; it supports: single, ddp")


def test_qlora_under_fsdp(capsys, run_dir):
    refused(capsys, run_dir, *SFT_FSDP, "--model.init_args.backbone.quantization", "nf4", named="nf4 (QLoRA) runs with DDP only")


def test_a_merged_export_under_fsdp(capsys, run_dir):
    refused(capsys, run_dir, *SFT_FSDP, "--model.init_args.save_merged", "true", named="model.save_merged")


def test_more_cpu_processes_than_cores(capsys, run_dir):
    too_many = str((os.cpu_count() or 1) + 1)
    refused(capsys, run_dir, *CONCARE, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", too_many, named="CPU cores")


def test_more_gpus_than_the_machine_has(capsys, run_dir):
    import torch

    asked = str(torch.cuda.device_count() + 1)
    refused(capsys, run_dir, *CONCARE, "--trainer.accelerator", "gpu", "--trainer.devices", asked, named="error: trainer: ")


def test_a_world_size_that_does_not_divide_the_training_subset(capsys, run_dir, tjh_expert):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU cores for 2 processes")
    args = [*RL, "--model.init_args.expert_attention", str(tjh_expert), "--data.init_args.train_patients", "3"]
    refused(capsys, run_dir, *args, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2", named="do not split evenly over 2 processes")


def test_the_fsdp_overlay_parses_on_every_paper_sft_config(capsys):
    for config in ("configs/tjh/sft_paper.yaml", "configs/mimic_iv/sft_paper.yaml"):
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", config, "--config", "configs/scale/sft_fsdp.yaml", "--print_config"])
        out = capsys.readouterr().out
        assert not stop.value.code and "FSDPStrategy" in out and "save_merged: false" in out
