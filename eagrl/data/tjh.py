"""Reader for the TJH COVID-19 cohort (Yan et al. 2020): xlsx -> per-patient daily rows.

Follows METHOD.md §1: forward-fill ``PATIENT_ID``; drop rows without ``RE_DATE`` (361 patients
remain); daily means per patient; 73 labs plus Sex (1 male, 0 female) and Age; mortality label.
Day 1 is the patient's first recorded day.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from eagrl.data.cohort import RawCohort
from eagrl.data.features import TJH_DROPPED_COLUMNS, TJH_FEATURES, TJH_LABS
from eagrl.errors import EAGRLInputError
from eagrl.paths import require_file

RAW_FILE = "tjh/raw/time_series_375_prerpocess_en.xlsx"
SPLIT_FILE = "tjh/splits/tjh_clinicrealm_split_ids.csv"
ID, DATE, AGE, GENDER, OUTCOME = "PATIENT_ID", "RE_DATE", "age", "gender", "outcome"


def source_files(data_dir: Path) -> list[Path]:
    return [data_dir / RAW_FILE]


def read_table(path: Path) -> pd.DataFrame:
    """Read the xlsx with one clear error when it is not a spreadsheet or lacks a needed column."""
    require_file(path, "TJH raw spreadsheet")
    try:
        frame = pd.read_excel(path)
    except Exception as err:  # openpyxl raises several unrelated types for a non-xlsx file
        raise EAGRLInputError(f"{path}: cannot be read as an xlsx spreadsheet ({type(err).__name__}: {err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    needed = [ID, DATE, AGE, GENDER, OUTCOME] + [name for name, _, _ in TJH_LABS]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise EAGRLInputError(f"{path}: missing required column(s) {missing}")
    return frame


def _numeric(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna()
    if bad.any():
        example = frame.loc[bad, column].iloc[0]
        raise EAGRLInputError(
            f"{path}: column {column!r} must be numeric, found {example!r} in {int(bad.sum())} row(s)"
        )
    return values


def load_tjh(data_dir: Path) -> RawCohort:
    path = data_dir / RAW_FILE
    frame = read_table(path)
    frame[ID] = frame[ID].ffill()
    frame[DATE] = pd.to_datetime(frame[DATE], errors="coerce")
    frame = frame[frame[DATE].notna() & frame[ID].notna()].copy()
    if frame.empty:
        raise EAGRLInputError(f"{path}: no rows with both {ID} and {DATE}: the cohort is empty")
    lab_names = [name for name, _, _ in TJH_LABS]
    for column in lab_names + [AGE, GENDER, OUTCOME, ID]:
        frame[column] = _numeric(frame, column, path)
    outcome = frame.groupby(ID)[OUTCOME].first()
    if not outcome.isin([0, 1]).all():
        raise EAGRLInputError(f"{path}: column {OUTCOME!r} must hold 0/1, found {sorted(outcome.unique())[:5]}")

    frame["day_date"] = frame[DATE].dt.normalize()
    daily = frame.groupby([ID, "day_date"], sort=True)[lab_names].mean()  # [patient-days, 73]
    per_patient = frame.groupby(ID).agg(age=(AGE, "first"), gender=(GENDER, "first"), outcome=(OUTCOME, "first"))

    ids = daily.index.get_level_values(0).to_numpy()
    dates = daily.index.get_level_values(1)
    first_date = pd.Series(dates, index=daily.index).groupby(level=0).transform("min")
    days = ((dates - first_date.to_numpy()).days + 1).to_numpy(np.int32)

    patients, counts = np.unique(ids, return_counts=True)  # sorted like the groupby
    offsets = np.zeros(len(patients) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    info = per_patient.loc[patients]
    sex = (info["gender"].to_numpy() == 1).astype(np.float32)  # 1 male, 2 female -> 1, 0
    age = info["age"].to_numpy(np.float32)
    demo = np.repeat(np.stack([sex, age], axis=1), counts, axis=0)  # [R, 2]
    values = np.concatenate([demo, daily.to_numpy(np.float32)], axis=1)  # [R, 75]
    assert values.shape[1] == len(TJH_FEATURES) and TJH_DROPPED_COLUMNS[0] not in lab_names

    patient_ids = np.array([str(int(p)) for p in patients])
    return RawCohort(
        dataset="tjh",
        features=TJH_FEATURES,
        sample_ids=patient_ids,
        patient_ids=patient_ids,
        offsets=offsets,
        values=values,
        days=days,
        labels={"mortality": info["outcome"].to_numpy(np.int8)},
    )


def published_split(data_dir: Path, cohort: RawCohort, split_file: str = SPLIT_FILE) -> np.ndarray:
    """Assign each patient the split of the ClinicRealm split file (train 140 / val 21 / test 200)."""
    path = require_file(data_dir / split_file, "TJH split file")
    try:
        table = pd.read_csv(path)
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as CSV ({err})") from err
    for column in (ID, "split"):
        if column not in table.columns:
            raise EAGRLInputError(f"{path}: missing required column {column!r} (expected columns PATIENT_ID,split)")
    bad = sorted(set(table["split"]) - {"train", "val", "test"})
    if bad:
        raise EAGRLInputError(f"{path}: column 'split' must hold train/val/test, found {bad}")
    mapping = dict(zip(table[ID].astype(str), table["split"]))
    unknown = [p for p in cohort.patient_ids if p not in mapping]
    if unknown:
        raise EAGRLInputError(f"{path}: {len(unknown)} cohort patient(s) have no split assigned")
    return np.array([mapping[p] for p in cohort.patient_ids])
