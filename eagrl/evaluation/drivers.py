"""What a run's test answers follow: per feature of the patient's record, how well its value separates the patients
the model called likely (ŷ ≥ 0.5) from the others, beside how well it separates the outcome (aggregates only).

    python -m eagrl.evaluation.drivers runs/tjh/rl_grpo [--top 10] [--json out.json]

An LLM's AUROC says that its ŷ ranks the patients, not what it reads. If the features that best tell its "likely"
answers apart are known markers of the outcome (on TJH: lymphocytes, D-dimer, hs-CRP), the model reads the record;
if they are the stay's length or the visit day, it reads something a clinician would not call a prediction. For each
feature: the value of the last visit the prompt showed (``visits_shown`` of ``generations.jsonl``; the latest value
within those visits), over the answered patients with that value, and

- ``auroc_yhat``: AUROC of the value for ŷ ≥ 0.5 (0.5: unrelated; far from 0.5 either way: the answers follow it);
- ``auroc_outcome``: AUROC of the value for the outcome over the same patients.

The cohort is read again as the run's ``config.yaml`` describes it (dataset, data folder, observation window), with
the loaders of ``eagrl.data``; the "day of stay" of the last visit shown is one more row. No patient's value or id is
printed or written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from eagrl.data.cohort import RawCohort
from eagrl.errors import EAGRLInputError

DAY = "day of stay (last visit shown)"


def _auroc(scores: np.ndarray, targets: np.ndarray) -> Optional[float]:
    from torchmetrics.functional.classification import binary_auroc

    if targets.min() == targets.max():
        return None
    return float(binary_auroc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.long)))


def answer_drivers(shown: np.ndarray, names: Sequence[str], y_hat: Sequence[Optional[float]], labels: Sequence[int], min_patients: int = 30) -> list[dict[str, Any]]:
    """Per feature, the AUROC of its shown value for ŷ ≥ 0.5 and for the outcome, over the answered patients that
    have it; sorted by how far ``auroc_yhat`` is from 0.5. shown: [N, F] (NaN: not shown); names: F; y_hat, labels: N
    (None: unanswered, left out). A feature shown for fewer than ``min_patients`` of them, or where every answer falls
    on one side of 0.5, is left out."""
    shown = np.asarray(shown, dtype=np.float64)
    if shown.ndim != 2 or shown.shape != (len(y_hat), len(names)) or len(labels) != len(y_hat):
        raise ValueError(f"answer_drivers: shown must be [N, F] = [{len(y_hat)}, {len(names)}] with N labels; got {shown.shape} and {len(labels)}")
    answered = np.array([y is not None for y in y_hat], dtype=bool)  # [N]
    likely = np.array([y is not None and y >= 0.5 for y in y_hat], dtype=bool)  # [N]
    outcome = np.asarray(labels, dtype=np.int64)  # [N]
    rows = []
    for j, name in enumerate(names):
        have = answered & ~np.isnan(shown[:, j])  # [N]
        if have.sum() < min_patients:
            continue
        a = _auroc(shown[have, j], likely[have].astype(np.int64))
        if a is None:
            continue
        rows.append({"feature": name, "patients": int(have.sum()), "auroc_yhat": a, "auroc_outcome": _auroc(shown[have, j], outcome[have])})
    return sorted(rows, key=lambda row: -abs(row["auroc_yhat"] - 0.5))


def last_shown(raw: RawCohort, ids: Sequence[str], visits: Sequence[int]) -> np.ndarray:
    """[N, F + 1]: per record, each feature's latest value within the last ``visits[i]`` visits of sample ``ids[i]``
    (NaN: not measured there), then the day of stay of the last visit."""
    index = {str(s): i for i, s in enumerate(raw.sample_ids)}
    out = np.full((len(ids), len(raw.features) + 1), np.nan)
    for n, (sample, k) in enumerate(zip(ids, visits)):
        if str(sample) not in index:
            raise EAGRLInputError(f"generations.jsonl: sample {n + 1} is not in the {raw.dataset} cohort read from the run's config")
        rows = raw.rows(index[str(sample)])
        values, days = raw.values[rows], raw.days[rows]  # [T, F], [T]
        values = values[-max(int(k), 1) :]
        for j in range(values.shape[1]):
            seen = values[~np.isnan(values[:, j]), j]
            if len(seen):
                out[n, j] = seen[-1]
        out[n, -1] = days[-1]
    return out


def cohort_of(run: Path) -> RawCohort:
    """The run's cohort, read as its ``config.yaml`` says (``data.init_args``): TJH, the synthetic cohort or MIMIC-IV."""
    import yaml

    from eagrl.data import mimic_iv, synthetic, tjh
    from eagrl.paths import data_dir

    config = run / "config.yaml"
    if not config.is_file():
        raise EAGRLInputError(f"{config} does not exist: expected the run directory of a `python -m eagrl fit`/`test` run")
    data = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("init_args") or {}
    dataset = data.get("dataset")
    if dataset == "synthetic":
        return synthetic.load_synthetic(int(data.get("synthetic_patients", 500)), int(data.get("synthetic_seed", 0)))
    if data.get("cohort_file") is not None:
        raise EAGRLInputError(f"{config}: data.init_args.cohort_file is set; only the datasets' own files are read here")
    if dataset == "tjh":
        return tjh.load_tjh(data_dir(data.get("data_dir")), data.get("observation_days"))
    if dataset == "mimic_iv":
        level = data.get("readmission_level", "icu") if data.get("task") == "readmission" else "icu"
        folder = Path(data.get("mimic_dir") or "mimic-iv-demo").expanduser()
        folder = folder if folder.is_absolute() else data_dir(data.get("data_dir")) / folder
        return mimic_iv.load_mimic_iv(
            folder, int(data.get("chunk_size", 1_000_000)), int(data.get("max_steps", 8)), False, data.get("observation_hours"), level
        )
    raise EAGRLInputError(f"{config}: data.init_args.dataset is {dataset!r}; expected tjh, synthetic or mimic_iv")


def run_drivers(run: Path, min_patients: int = 30) -> dict[str, Any]:
    """{"patients", "answered", "likely", "features": answer_drivers(...)} for a run's ``generations.jsonl``."""
    path = run / "generations.jsonl"
    if not path.is_file():
        raise EAGRLInputError(f"{path} does not exist: expected a run that answered its test patients")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for key in ("id", "label", "y_hat", "visits_shown"):
        if records and key not in records[0]:
            raise EAGRLInputError(f"{path}: records have no {key!r} field")
    raw = cohort_of(run)
    shown = last_shown(raw, [r["id"] for r in records], [r["visits_shown"] for r in records])  # [N, F + 1]
    y_hat = [r["y_hat"] for r in records]
    return {
        "patients": len(records),
        "answered": sum(y is not None for y in y_hat),
        "likely": sum(y is not None and y >= 0.5 for y in y_hat),
        "features": answer_drivers(shown, [*raw.feature_names, DAY], y_hat, [r["label"] for r in records], min_patients),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eagrl.evaluation.drivers", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with generations.jsonl and config.yaml")
    parser.add_argument("--top", type=int, default=10, help="features to print (default 10)")
    parser.add_argument("--min-patients", type=int, default=30, help="leave out features shown for fewer answered patients (default 30)")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    args = parser.parse_args(argv)
    out = run_drivers(args.run, args.min_patients)
    print(f"{args.run}: {out['answered']} of {out['patients']} patients answered, {out['likely']} with ŷ >= 0.5")
    print("| feature | patients | AUROC for ŷ >= 0.5 | AUROC for the outcome |\n|---|---|---|---|")
    for row in out["features"][: args.top]:
        outcome = "—" if row["auroc_outcome"] is None else f"{100 * row['auroc_outcome']:.1f}"
        print(f"| {row['feature']} | {row['patients']} | {100 * row['auroc_yhat']:.1f} | {outcome} |")
    if args.json:
        from eagrl.io import write_json_atomic

        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
