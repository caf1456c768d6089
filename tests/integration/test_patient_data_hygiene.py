"""Patient-data hygiene: a tiny MIMIC-IV pipeline (ConCare -> distillation -> SFT -> RL, W&B offline) runs
through the real CLI, then everything it wrote outside the data cache is scanned for patient ids (subject,
admission, ICU stay) and for raw record text (the patient-specific lines of the serialised EHR).

The only files allowed to hold them are the per-patient artefacts the stages hand to each other
(``PATIENT_LEVEL_FILES``: the expert's attention export, the distilled trajectories, the generations).
They stay in the run directory and are never logged; the README says they must not be shared.
Everything else must be clean: logs, W&B offline files (config, metrics, console capture), metrics,
run info, configs, checkpoints (their hyperparameters and every non-tensor value) and exported models.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import run_cli

PATIENT_LEVEL_FILES = {"expert_attention.jsonl", "trajectories.jsonl", "trajectories.jsonl.done", "generations.jsonl"}

pytestmark = pytest.mark.slow


def _ids(data_root: Path) -> set[str]:
    demo = data_root / "mimic-iv-demo"
    ids = set()
    for table, column in (("hosp/patients.csv.gz", "subject_id"), ("hosp/admissions.csv.gz", "hadm_id"), ("icu/icustays.csv.gz", "stay_id")):
        ids |= {str(v) for v in pd.read_csv(demo / table, usecols=[column])[column].dropna().astype("int64")}
    return ids


def _record_lines(module) -> set[str]:
    """Lines of the serialised EHR, in both text styles, that belong to one patient only (values, not headers)."""
    seen: dict[str, int] = {}
    for data in module.datasets.values():
        for i in range(len(data)):
            text = data.text(i, style="paper") + "\n" + data.text(i, style="compact")
            for line in {line.strip() for line in text.splitlines()}:
                if len(line) >= 20 and re.search(r"\d", line):
                    seen[line] = seen.get(line, 0) + 1
    return {line for line, count in seen.items() if count == 1}


def _readable(path: Path) -> str:
    if path.suffix == ".ckpt":  # hyperparameters and every non-tensor value; tensors are weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return repr({k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")})
    return path.read_bytes().decode("latin-1")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, session_cache) -> Path:
    root = tmp_path_factory.mktemp("hygiene")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb-home"),
        "WANDB_CACHE_DIR": str(root / "wandb-home/cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-home/config"),
        "WANDB_DATA_DIR": str(root / "wandb-home/data"),
    }
    expert = root / "concare/expert_attention.jsonl"
    trajectories = root / "distill/trajectories.jsonl"
    stages = [
        ["fit", "--config", "configs/mimic_iv/concare_mortality.yaml", "--config", "configs/smoke/concare.yaml", "--trainer.default_root_dir", str(root / "concare")],
        ["predict", "--config", "configs/mimic_iv/distill.yaml", "--config", "configs/smoke/distill.yaml",
         "--trainer.default_root_dir", str(root / "distill"), "--model.init_args.expert_attention", str(expert)],
        ["fit", "--config", "configs/mimic_iv/sft.yaml", "--config", "configs/smoke/sft.yaml", "--trainer.default_root_dir", str(root / "sft"),
         "--data.init_args.trajectories", str(trajectories), "--model.init_args.expert_attention", str(expert)],
        ["fit", "--config", "configs/mimic_iv/rl.yaml", "--config", "configs/smoke/rl.yaml", "--trainer.default_root_dir", str(root / "rl"),
         "--model.init_args.expert_attention", str(expert)],
    ]  # fmt: skip
    for args in stages:
        result = run_cli(*args, "--wandb", "offline", cache=session_cache, env=env, fresh_process=True)  # W&B
        assert result.returncode == 0, result.stderr[-3000:]
        (root / f"{Path(args[args.index('--trainer.default_root_dir') + 1]).name}.console.log").write_text(result.stdout + result.stderr)
    return root


def test_the_pipeline_wrote_what_is_scanned(pipeline):
    written = {p.name for p in pipeline.rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in written)  # W&B offline run files
    assert {"config.yaml", "metrics.json", "run_info.json", "metrics.csv", "last.ckpt", "adapter_model.safetensors"} <= written
    assert PATIENT_LEVEL_FILES - {"trajectories.jsonl.done"} <= written  # so the exclusion list is not stale


def test_nothing_outside_the_patient_level_files_holds_an_id_or_record_text(pipeline, data_root, mimic_module):
    ids = _ids(data_root)
    lines = _record_lines(mimic_module)
    assert len(ids) > 300 and len(lines) > 100
    id_pattern = re.compile(r"(?<!\d)(" + "|".join(sorted(ids)) + r")(?!\d)")
    scanned, leaks = 0, []
    for path in sorted(p for p in pipeline.rglob("*") if p.is_file() and p.name not in PATIENT_LEVEL_FILES):
        text = _readable(path)
        scanned += 1
        if match := id_pattern.search(text):
            leaks.append(f"{path.relative_to(pipeline)}: a patient id at offset {match.start()}")
        if hit := next((line for line in lines if line in text), None):
            leaks.append(f"{path.relative_to(pipeline)}: a line of a patient's record ({len(hit)} chars)")
    assert scanned > 20
    assert not leaks, leaks  # messages name the file only, never the id or the text


def test_the_scan_finds_an_id_where_there_is_one(pipeline, data_root, mimic_module):
    """The scan is not blind: the patient-level files it skips do hold ids and record lines."""
    ids = _ids(data_root)
    id_pattern = re.compile(r"(?<!\d)(" + "|".join(sorted(ids)) + r")(?!\d)")
    assert id_pattern.search((pipeline / "concare/expert_attention.jsonl").read_text())
