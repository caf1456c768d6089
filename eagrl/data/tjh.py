"""Reader for the TJH COVID-19 cohort (Yan et al. 2020): xlsx -> per-patient daily rows.

Follows METHOD.md §1: forward-fill ``PATIENT_ID``; drop rows without ``RE_DATE`` (361 patients
remain); daily means per patient; 73 labs plus Sex (1 male, 0 female) and Age; mortality label.
Day 1 is the patient's first recorded day.

Cohort rules (the README's data section): rows whose ``RE_DATE`` date is after the ``Discharge time`` date
(discharge or death) are dropped (counted), and a patient left with no row is excluded; with
``observation_days`` N, only rows before the first record's date + N days are read, and a patient whose
stay ends (``Discharge time``) before then is excluded. Excluded patients stay in the returned cohort with
no rows and their reason in ``exclusion``, so the split file is checked against the whole cohort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from eagrl.data.cohort import RawCohort
from eagrl.data.features import TJH_DROPPED_COLUMNS, TJH_FEATURES, TJH_LABS
from eagrl.data.preprocess import read_split_file
from eagrl.errors import EAGRLInputError
from eagrl.paths import require_file

RAW_FILE = "tjh/raw/time_series_375_prerpocess_en.xlsx"
SPLIT_FILE = "tjh/splits/tjh_clinicrealm_split_ids.csv"
ID, DATE, AGE, GENDER, OUTCOME = "PATIENT_ID", "RE_DATE", "age", "gender", "outcome"
DISCHARGE = "Discharge time"
PUBLISHED_COUNTS = {"train": 140, "val": 21, "test": 200}

# Why a patient leaves the cohort (the values of RawCohort.exclusion).
ALL_AFTER_DISCHARGE = "every record after discharge"
DIED_IN_WINDOW = "died before the observation window closed"
DISCHARGED_IN_WINDOW = "discharged alive before the observation window closed"


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


def _discharge(frame: pd.DataFrame, path: Path) -> pd.Series | None:
    """Per-row discharge (or death) time, or None when the file has no such column."""
    if DISCHARGE not in frame.columns:
        return None
    parsed = pd.to_datetime(frame[DISCHARGE], errors="coerce")
    bad = parsed.isna() & frame[DISCHARGE].notna()
    if bad.any():
        raise EAGRLInputError(f"{path}: column {DISCHARGE!r} must hold dates, found {frame.loc[bad, DISCHARGE].iloc[0]!r}")
    return parsed.groupby(frame[ID]).transform("first")


def load_tjh(data_dir: Path, observation_days: int | None = None, raw_file: str = RAW_FILE) -> RawCohort:
    """Every patient with a dated record (excluded ones with no rows and their reason; see the module docstring)."""
    if observation_days is not None and observation_days <= 0:
        raise EAGRLInputError(f"observation_days must be a positive number of days, got {observation_days}")
    path = data_dir / raw_file
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
    per_patient = frame.groupby(ID).agg(age=(AGE, "first"), gender=(GENDER, "first"), outcome=(OUTCOME, "first"))
    patients = per_patient.index.to_numpy()  # sorted, every patient with a dated record

    frame["day_date"] = frame[DATE].dt.normalize()
    discharge = _discharge(frame, path)
    notes: dict = {}
    if discharge is None:
        notes["post_discharge_rule"] = f"skipped: the file has no {DISCHARGE!r} column"
        discharge = pd.Series(pd.NaT, index=frame.index)
    after = (frame["day_date"] > discharge.dt.normalize()).to_numpy()  # NaT compares False
    notes["rows_after_discharge"] = int(after.sum())
    notes["patients_with_rows_after_discharge"] = int(frame.loc[after, ID].nunique())
    frame, discharge = frame[~after], discharge[~after]
    end_of_stay = discharge.groupby(frame[ID]).first().reindex(patients)
    first_date = frame.groupby(ID)["day_date"].min().reindex(patients)

    reason = np.full(len(patients), "", dtype=object)
    if observation_days is not None:
        window_end = first_date + pd.Timedelta(days=observation_days)  # [patients], NaT without rows
        ended = (end_of_stay < window_end).to_numpy()
        died = per_patient["outcome"].to_numpy() == 1
        reason[ended & died] = DIED_IN_WINDOW
        reason[ended & ~died] = DISCHARGED_IN_WINDOW
        frame = frame[(frame[DATE] < frame[ID].map(window_end)).to_numpy()]
    reason[(reason == "") & ~np.isin(patients, frame[ID].unique())] = ALL_AFTER_DISCHARGE

    daily = frame.groupby([ID, "day_date"], sort=True)[lab_names].mean()  # [patient-days, 73]
    ids = daily.index.get_level_values(0).to_numpy()
    dates = daily.index.get_level_values(1)
    days = ((dates - first_date.loc[ids].to_numpy()).days + 1).to_numpy(np.int32)

    counts = pd.Series(ids).value_counts().reindex(patients).fillna(0).to_numpy(np.int64)
    offsets = np.zeros(len(patients) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    sex = (per_patient["gender"].to_numpy() == 1).astype(np.float32)  # 1 male, 2 female -> 1, 0
    age = per_patient["age"].to_numpy(np.float32)
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
        labels={"mortality": per_patient["outcome"].to_numpy(np.int8)},
        exclusion=reason.astype(str),
        notes=notes,
    )


def published_split(data_dir: Path, cohort: RawCohort, split_file: str = SPLIT_FILE) -> np.ndarray:
    """Assign each patient the split of the ClinicRealm split file, checked to hold train 140 / val 21 /
    test 200 patients (before the cohort's exclusions)."""
    path = require_file(data_dir / split_file, "TJH split file")
    split = read_split_file(path, cohort)
    found = {name: int((split == name).sum()) for name in PUBLISHED_COUNTS}
    if found != PUBLISHED_COUNTS:
        raise EAGRLInputError(f"{path}: the published split has {PUBLISHED_COUNTS} patients, this cohort gets {found}")
    return split
