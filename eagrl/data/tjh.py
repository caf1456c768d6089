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
from eagrl.data.features import TJH_DISPLAY_NAMES, TJH_DROPPED_COLUMNS, TJH_FEATURES, TJH_LABS
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


def read_table(path: Path, features: list[str] | None = None, allow_missing: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Read the spreadsheet (xlsx, or csv by its suffix) with one clear error when it cannot be read or lacks a
    column. ``PATIENT_ID``, ``RE_DATE`` and ``outcome`` are always needed; of the feature columns (``age``,
    ``gender`` and the labs) those of ``features`` (the dataset's feature names; None: all). With
    ``allow_missing`` a lacking feature column is added empty. Returns the frame and the names of the features
    whose column was lacking (empty unless ``allow_missing``)."""
    require_file(path, "TJH-schema cohort file")
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path)
    except Exception as err:  # openpyxl raises several unrelated types for a non-xlsx file
        kind = "CSV" if path.suffix.lower() == ".csv" else "an xlsx spreadsheet"
        raise EAGRLInputError(f"{path}: cannot be read as {kind} ({type(err).__name__}: {err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in (ID, DATE, OUTCOME) if c not in frame.columns]
    if missing:
        raise EAGRLInputError(f"{path}: missing required column(s) {missing}")
    column_of = {"Sex": GENDER, "Age": AGE} | {TJH_DISPLAY_NAMES.get(n, n): n for n, _, _ in TJH_LABS}  # feature -> column
    wanted = [name for name in column_of if features is None or name in features]
    lacking = [name for name in wanted if column_of[name] not in frame.columns]
    if lacking and not allow_missing:
        raise EAGRLInputError(
            f"{path}: missing feature column(s) {[column_of[n] for n in lacking]}; pass --data.init_args.allow_missing_features "
            "true to score the cohort with them as never measured"
        )
    for name, column in column_of.items():
        if column not in frame.columns:
            frame[column] = np.nan  # lacking, or outside the selected features (dropped later)
    return frame, lacking


def parse_dates(frame: pd.DataFrame, column: str, path: Path, date_format: str | None = None) -> pd.Series:
    """``column`` as datetimes (``date_format``: a strftime pattern, else inferred per value); an empty cell is
    NaT, a written value that is not a date is one error naming the column, an example and ``data.date_format``."""
    text = frame[column]
    parsed = pd.to_datetime(text, errors="coerce", format=date_format or "mixed")
    bad = parsed.isna() & text.notna() & (text.astype(str).str.strip() != "")
    if bad.any():
        hint = f"does not match data.date_format {date_format!r}" if date_format else "is not a date pandas can read; give data.date_format"
        raise EAGRLInputError(f"{path}: column {column!r} value {text[bad].iloc[0]!r} {hint} ({int(bad.sum())} row(s))")
    return parsed


def _numeric(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna()
    if bad.any():
        example = frame.loc[bad, column].iloc[0]
        raise EAGRLInputError(
            f"{path}: column {column!r} must be numeric, found {example!r} in {int(bad.sum())} row(s)"
        )
    return values


def _discharge(frame: pd.DataFrame, path: Path, date_format: str | None = None) -> pd.Series | None:
    """Per-row discharge (or death) time, or None when the file has no such column."""
    if DISCHARGE not in frame.columns:
        return None
    parsed = parse_dates(frame, DISCHARGE, path, date_format)
    return parsed.groupby(frame[ID]).transform("first")


def load_tjh(
    data_dir: Path,
    observation_days: int | None = None,
    raw_file: str | Path = RAW_FILE,
    features: list[str] | None = None,
    allow_missing: bool = False,
    date_format: str | None = None,
) -> RawCohort:
    """Every patient with a dated record (excluded ones with no rows and their reason; see the module docstring).

    ``raw_file``: relative to ``data_dir`` or absolute (an external cohort in the TJH schema). ``features``,
    ``allow_missing``: see ``read_table``; the features whose column the file lacks are in ``notes["absent_features"]``.
    """
    if observation_days is not None and observation_days <= 0:
        raise EAGRLInputError(f"observation_days must be a positive number of days, got {observation_days}")
    path = data_dir / raw_file
    frame, absent = read_table(path, features, allow_missing)
    frame[ID] = frame[ID].ffill()
    frame[DATE] = parse_dates(frame, DATE, path, date_format)
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
    discharge = _discharge(frame, path, date_format)
    notes: dict = {"absent_features": absent} if absent else {}
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
    gender = per_patient["gender"].to_numpy(np.float64)
    sex = np.where(np.isnan(gender), np.nan, gender == 1).astype(np.float32)  # 1 male, 2 female -> 1, 0; unknown NaN
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
