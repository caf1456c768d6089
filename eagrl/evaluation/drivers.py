"""What a run's test answers follow: per feature of the patient's text, how well what the text tells of it separates
the patients the model called likely (ŷ ≥ 0.5) from the others, beside how well it separates the outcome.

    python -m eagrl.evaluation.drivers runs/tjh/rl_grpo [--top 10] [--json out.json]

An LLM's AUROC says that its ŷ ranks the patients, not what it reads. If the features that best tell its "likely"
answers apart are known markers of the outcome, in the outcome's direction, the model reads the record; if they go
against the outcome's direction, it reads the record backwards. For each feature, over the answered patients whose
text gives it (at least ``min_patients``):

- ``auroc_yhat``: AUROC of the feature for ŷ ≥ 0.5 (0.5: unrelated; far from 0.5 either way: the answers follow it);
- ``auroc_outcome``: AUROC of the feature for the outcome over the same patients.

The feature is what the text showed (``eagrl.data.text.shown_values``): its last value within the visits the prompt
showed (``visits_shown`` of ``generations.jsonl``; ŷ as saved, or ``--reading strict``: only what the reward path reads, no
bare number above 1 taken as a percentage); in the compact style a feature normal at every measurement is
written as "normal", so those patients share one value inside the range. The visit's day of stay (in the text's
header) is one more row. One feature at a time: a feature that follows a marker ranks high too. The cohort is read
again as the run's ``config.yaml`` describes it (dataset, data folder, observation window, feature subset), with the
loaders of ``eagrl.data``, and each answer's label must match it. AUROCs are rank-based (``metrics.ranking``). No
patient's value or id is printed or written.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from eagrl.data.cohort import RawCohort
from eagrl.data.text import TextStyle, shown_values
from eagrl.errors import EAGRLInputError
from eagrl.evaluation.metrics import ranking
from eagrl.evaluation.readings import READINGS, run_answers

DAY = "day of stay (last visit shown)"
MIN_PATIENTS = 10  # the fewest answered patients a feature may be ranked over
DEFAULT_MIN_PATIENTS = 30  # ... and the default


def _auroc(scores: np.ndarray, targets: np.ndarray) -> Optional[float]:
    """Rank-based AUROC of scores [n] (any scale) for targets [n] in {0, 1}; None with one class."""
    if targets.min() == targets.max():
        return None
    return ranking(torch.from_numpy(scores.astype(np.float64)), torch.from_numpy(targets.astype(np.int64)))["auroc"]


def _answered(y: Optional[float]) -> bool:
    return y is not None and math.isfinite(y)


def answer_drivers(
    shown: np.ndarray, names: Sequence[str], y_hat: Sequence[Optional[float]], labels: Sequence[int], min_patients: int = DEFAULT_MIN_PATIENTS
) -> list[dict[str, Any]]:
    """Per feature, the AUROC of its shown value for ŷ ≥ 0.5 and for the outcome, over the answered patients that
    have it; sorted by how far ``auroc_yhat`` is from 0.5. shown: [N, F] (NaN: not shown); names: F; y_hat, labels: N
    (None or NaN: unanswered, left out). A feature shown for fewer than ``min_patients`` of them, or where every answer
    falls on one side of 0.5, is left out."""
    shown = np.asarray(shown, dtype=np.float64)
    if shown.ndim != 2 or shown.shape != (len(y_hat), len(names)) or len(labels) != len(y_hat):
        raise ValueError(f"answer_drivers: shown must be [N, F] = [{len(y_hat)}, {len(names)}] with N labels; got {shown.shape} and {len(labels)}")
    answered = np.array([_answered(y) for y in y_hat], dtype=bool)  # [N]
    likely = np.array([_answered(y) and y >= 0.5 for y in y_hat], dtype=np.int64)  # [N]
    outcome = np.asarray(labels, dtype=np.int64)  # [N]
    rows = []
    for j, name in enumerate(names):
        have = answered & ~np.isnan(shown[:, j])  # [N]
        if have.sum() < min_patients:
            continue
        a = _auroc(shown[have, j], likely[have])
        if a is not None:
            rows.append({"feature": name, "patients": int(have.sum()), "auroc_yhat": a, "auroc_outcome": _auroc(shown[have, j], outcome[have])})
    return sorted(rows, key=lambda row: -abs(row["auroc_yhat"] - 0.5))


def last_shown(raw: RawCohort, ids: Sequence[str], visits: Sequence[int], style: TextStyle = "paper") -> np.ndarray:
    """[N, F + 1]: per record, what the text of sample ``ids[i]`` over its last ``visits[i]`` visits tells of each
    feature (``shown_values``), then the day of stay of the last of them."""
    index = {str(s): i for i, s in enumerate(raw.sample_ids)}
    out = np.full((len(ids), len(raw.features) + 1), np.nan)
    for n, (sample, k) in enumerate(zip(ids, visits)):
        if str(sample) not in index:
            raise EAGRLInputError(f"generations.jsonl record {n + 1}: its patient is not in the {raw.dataset} cohort read from the run's config")
        rows = raw.rows(index[str(sample)])
        values, days = raw.values[rows][-max(int(k), 1) :], raw.days[rows]  # [k, F], [T]
        out[n, :-1] = shown_values(values, raw.features, style)
        out[n, -1] = days[-1]
    return out


def cohort_of(run: Path) -> tuple[RawCohort, dict[str, Any]]:
    """The run's cohort read as its ``config.yaml`` says (TJH, the synthetic cohort or MIMIC-IV; ``data.init_args``,
    which is returned too), with its feature subset."""
    import yaml

    from eagrl.data import mimic_iv, synthetic, tjh
    from eagrl.data.features import resolve_feature_names
    from eagrl.paths import data_dir

    config = run / "config.yaml"
    if not config.is_file():
        raise EAGRLInputError(f"{config} does not exist: expected the run directory of a `python -m eagrl fit`/`test` run")
    data = ((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}).get("init_args") or {}
    dataset = data.get("dataset")
    if data.get("cohort_file") is not None:
        raise EAGRLInputError(f"{config}: data.init_args.cohort_file is set; only the datasets' own files are read here")
    if dataset == "synthetic":
        raw = synthetic.load_synthetic(int(data.get("synthetic_patients", 500)), int(data.get("synthetic_seed", 0)))
    elif dataset == "tjh":
        raw = tjh.load_tjh(data_dir(data.get("data_dir")), data.get("observation_days"))
    elif dataset == "mimic_iv":
        level = data.get("readmission_level", "icu") if data.get("task") == "readmission" else "icu"
        folder = Path(data.get("mimic_dir") or "mimic-iv-demo").expanduser()
        folder = folder if folder.is_absolute() else data_dir(data.get("data_dir")) / folder
        raw = mimic_iv.load_mimic_iv(folder, int(data.get("chunk_size", 1_000_000)), int(data.get("max_steps", 8)), False, data.get("observation_hours"), level)
    else:
        raise EAGRLInputError(f"{config}: data.init_args.dataset is {dataset!r}; expected tjh, synthetic or mimic_iv")
    if data.get("features"):
        raw = raw.select_features(resolve_feature_names(list(data["features"]), dataset))
    return raw, data


def _records(run: Path, reading: Optional[str] = None) -> list[dict[str, Any]]:
    """The run's answers; ``reading`` (a key of ``readings.READINGS``): ŷ read again from each completion that way
    (None: the ``y_hat`` the evaluation saved)."""
    from eagrl.llm.parsing import parse_probability

    def read(r: dict[str, Any]) -> dict[str, Any]:
        y = None if r["y_hat"] is None else float(r["y_hat"])
        if reading is not None:
            y = parse_probability(str(r["completion"]), **READINGS[reading])
        return {"id": str(r["id"]), "label": int(r["label"]), "y_hat": y, "visits": int(r["visits_shown"])}

    return run_answers(run, read, "'id', 'label', 'y_hat', 'visits_shown'" + (" and 'completion'" if reading else ""))


def run_drivers(run: Path, min_patients: int = DEFAULT_MIN_PATIENTS, reading: Optional[str] = None) -> dict[str, Any]:
    """{"patients", "answered", "likely", "features": answer_drivers(...)} for a run's ``generations.jsonl`` (``reading``:
    see ``_records``)."""
    records = _records(run, reading)
    raw, data = cohort_of(run)
    index = {str(s): i for i, s in enumerate(raw.sample_ids)}
    labels = raw.labels[data.get("task", "mortality")]
    mismatched = sum(r["id"] in index and int(labels[index[r["id"]]]) != r["label"] for r in records)
    if mismatched:
        raise EAGRLInputError(f"{run}: {mismatched} of {len(records)} answers carry another label than the cohort read from config.yaml: not the run's cohort")
    style = data.get("text_style", "paper")
    shown = last_shown(raw, [r["id"] for r in records], [r["visits"] for r in records], style)  # [N, F + 1]
    y_hat = [r["y_hat"] for r in records]
    return {
        "patients": len(records),
        "answered": sum(_answered(y) for y in y_hat),
        "likely": sum(_answered(y) and y >= 0.5 for y in y_hat),
        "text_style": style,
        "reading": reading or "saved",
        "features": answer_drivers(shown, [*raw.feature_names, DAY], y_hat, [r["label"] for r in records], min_patients),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eagrl.evaluation.drivers", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with generations.jsonl and config.yaml")
    parser.add_argument("--top", type=int, default=10, help="features to print (default 10)")
    parser.add_argument(
        "--min-patients", type=int, default=DEFAULT_MIN_PATIENTS,
        help=f"leave out features shown to fewer answered patients (default {DEFAULT_MIN_PATIENTS}, at least {MIN_PATIENTS})",
    )  # fmt: skip
    parser.add_argument("--reading", choices=list(READINGS), help="read ŷ again from the completions this way (default: the saved ŷ)")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    args = parser.parse_args(argv)
    if args.min_patients < MIN_PATIENTS:
        parser.error(f"--min-patients must be at least {MIN_PATIENTS}")
    try:
        out = run_drivers(args.run, args.min_patients, args.reading)
    except EAGRLInputError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.run}: {out['answered']} of {out['patients']} patients answered, {out['likely']} with ŷ >= 0.5 ({out['text_style']} text, ŷ {out['reading']})")
    if not out["features"]:
        why = "every answer is on one side of 0.5" if out["likely"] in (0, out["answered"]) else f"no feature is shown to {args.min_patients} answered patients"
        print(f"nothing to rank: {why}")
    else:
        print("| feature | patients | AUROC for ŷ >= 0.5 | AUROC for the outcome |\n|---|---|---|---|")
        for row in out["features"][: args.top]:
            outcome = "—" if row["auroc_outcome"] is None else f"{100 * row['auroc_outcome']:.1f}"
            print(f"| {row['feature']} | {row['patients']} | {100 * row['auroc_yhat']:.1f} | {outcome} |")
    if args.json:
        from eagrl.io import write_json_atomic

        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
