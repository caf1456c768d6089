"""Reader for MIMIC-IV in its native PhysioNet layout (``hosp/``, ``icu/`` with csv.gz files).

One sample per ICU stay (METHOD.md §1): the 17 mimic3-benchmark variables from ``icu/chartevents``
with unit conversions and GCS total, Sex and Age from ``hosp/patients``; daily last value; days up to
the 8th-from-last collapsed into one row (at most ``max_steps`` rows). ``chartevents`` is read in
chunks of ``chunk_size`` rows, only the needed columns and itemids, and every chunk is reduced to one
value per (stay, day, variable) at once, so peak memory follows the chunk size and the number of
stay-days, never the ~400 million rows of the full table.

Labels (the README's data section states them with the cohort rules):

- in-hospital mortality = death (``deathtime``, or ``dod``) within [admittime, dischtime];
- 30-day readmission, ICU level (the group's definition, the default): the patient's next ICU stay starts
  within 30 days of this stay's ``outtime`` (a return to the ICU within the same hospital admission
  counts), or the patient dies between this stay's ``intime`` and 30 days after its ``outtime``
  (``deathtime``, else ``dod`` by date): readmission "including mortality", so a death in the ICU is a
  positive. On the demo: 39 of 140 stays;
- 30-day readmission, hospital level (``readmission_level="hospital"``): the patient's next hospital
  admission starts within 30 days of this admission's ``dischtime``; stays whose patient died in hospital
  leave the cohort (counted).

Cohort rules: values outside a variable's physiological range (``ChartVariable.plausible``) become
missing and are counted per variable; with ``observation_hours``, only events with ``charttime`` <
``intime`` + hours are read, and stays that end before the window closes (death, or ICU discharge) leave
the cohort; stays with no charted value (in the window) leave it too. Excluded stays stay in the returned
cohort with no rows and their reason in ``exclusion``, so the split can be made before the exclusions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from eagrl.data.cohort import RawCohort
from eagrl.data.features import (
    CAPILLARY_REFILL_TEXT,
    GCS_COMPONENTS,
    GCS_TOTAL,
    MIMIC_FEATURES,
    MIMIC_VARIABLES,
)
from eagrl.errors import EAGRLInputError
from eagrl.paths import require_file

PATIENTS, ADMISSIONS = "hosp/patients.csv.gz", "hosp/admissions.csv.gz"
ICUSTAYS, CHARTEVENTS = "icu/icustays.csv.gz", "icu/chartevents.csv.gz"
READMISSION_DAYS = 30

_DYNAMIC = [f.name for f in MIMIC_FEATURES if not f.demographic]
_ITEM_TO_FEATURE = {item: v.spec.name for v in MIMIC_VARIABLES for item in v.itemids}
_ITEM_PRIORITY = {item: rank for v in MIMIC_VARIABLES for rank, item in enumerate(v.itemids)}  # 0: the variable's first itemid
_CONVERSIONS = {item: how for v in MIMIC_VARIABLES for item, how in v.convert}
_PLAUSIBLE_LOW = {v.spec.name: float(v.plausible[0]) for v in MIMIC_VARIABLES}
_PLAUSIBLE_HIGH = {v.spec.name: float(v.plausible[1]) for v in MIMIC_VARIABLES}
_CHARTED = [v.spec.name for v in MIMIC_VARIABLES if v.itemids]  # GCS total is derived from charted components
_CAPILLARY = "Capillary refill rate"

# Why a stay leaves the cohort (the values of RawCohort.exclusion).
DIED_IN_HOSPITAL = "died in hospital (hospital-level readmission)"
DIED_IN_WINDOW = "died before the observation window closed"
LEFT_IN_WINDOW = "left the ICU before the observation window closed"
NO_VALUE = "no charted value"
NO_VALUE_IN_WINDOW = "no charted value in the observation window"


def source_files(data_dir: Path) -> list[Path]:
    return [data_dir / p for p in (PATIENTS, ADMISSIONS, ICUSTAYS, CHARTEVENTS)]


def _read_csv(path: Path, columns: list[str], what: str, **kwargs) -> pd.DataFrame:
    require_file(path, what)
    try:
        header = pd.read_csv(path, nrows=0)
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as a CSV table ({type(err).__name__}: {err})") from err
    missing = [c for c in columns if c not in header.columns]
    if missing:
        raise EAGRLInputError(f"{path}: missing required column(s) {missing}")
    return pd.read_csv(path, usecols=columns, **kwargs)


def _dates(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    for column in columns:
        parsed = pd.to_datetime(frame[column], errors="coerce")
        bad = parsed.isna() & frame[column].notna()
        if bad.any():
            raise EAGRLInputError(
                f"{path}: column {column!r} must hold dates, found {frame.loc[bad, column].iloc[0]!r}"
            )
        frame[column] = parsed


def _convert(itemid: pd.Series, value: pd.Series) -> pd.Series:
    """Apply the per-itemid unit conversions of METHOD.md §1 (F->C, inch->cm, lbs->kg, % -> fraction)."""
    return convert_units(itemid.map(_CONVERSIONS), value)


CONVERSIONS = ("f_to_c", "inch_to_cm", "lbs_to_kg", "percent_to_fraction")


def convert_units(how: pd.Series, value: pd.Series) -> pd.Series:
    """``value`` converted as ``how`` says per row (one of ``CONVERSIONS``, or NaN/empty: none); a
    percentage is made a fraction only when above 1 (charted either way)."""
    value = value.copy()
    f = how == "f_to_c"
    value[f] = (value[f] - 32.0) * 5.0 / 9.0
    value[how == "inch_to_cm"] *= 2.54
    value[how == "lbs_to_kg"] *= 0.453592
    pct = (how == "percent_to_fraction") & (value > 1.0)
    value[pct] /= 100.0
    return value


def last_first(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` ordered so that the value a day keeps comes last: by ``charttime``, then, at one time, the
    itemid listed first for its variable (``priority`` 0; e.g. "Respiratory Rate" over "Respiratory Rate
    (spontaneous)"), then the larger value. The order does not depend on the source file's row order, so
    the native and the MEDS reader keep the same value."""
    return frame.sort_values(["charttime", "priority", "value"], ascending=[True, False, True], kind="stable")


def reduce_daily(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the last value per (stay_id, date, feature) (``last_first``'s order)."""
    return last_first(frame).drop_duplicates(["stay_id", "date", "feature"], keep="last")


def implausible_values(feature: pd.Series, value: pd.Series) -> pd.Series:
    """[n] bool: a value outside its variable's physiological range."""
    return value.notna() & ((value < feature.map(_PLAUSIBLE_LOW)) | (value > feature.map(_PLAUSIBLE_HIGH)))


def read_chartevents(
    path: Path,
    stay_ids: set[int],
    chunk_size: int,
    progress: bool = True,
    window_end: pd.Series | None = None,
    implausible: dict[str, int] | None = None,
) -> pd.DataFrame:
    """Daily last value per (stay_id, date, feature) from chartevents, read chunk by chunk.

    ``window_end``: stay_id -> the end of its observation window; later events are dropped before the daily
    reduction. Values outside their variable's plausible range become missing (an earlier value of the
    day then counts) and are counted per variable into ``implausible``.
    """
    columns = ["stay_id", "charttime", "itemid", "value", "valuenum"]
    _read_csv(path, columns, "MIMIC-IV chartevents", nrows=0)
    reader = pd.read_csv(
        path,
        usecols=columns,
        chunksize=chunk_size,
        dtype={"stay_id": "float64", "itemid": "int64", "value": "string", "valuenum": "float64"},
    )
    parts: list[pd.DataFrame] = []
    for chunk in tqdm(reader, desc="chartevents", unit="chunk", disable=not progress, leave=False):
        chunk = chunk[chunk["itemid"].isin(_ITEM_TO_FEATURE.keys())]
        chunk = chunk[chunk["stay_id"].isin(stay_ids)]
        if chunk.empty:
            continue
        feature = chunk["itemid"].map(_ITEM_TO_FEATURE)
        value = chunk["valuenum"]
        cap = feature == _CAPILLARY
        if cap.any():  # text-only in MIMIC-IV: map the two documented answers to 0/1
            text = chunk.loc[cap, "value"].str.strip().str.lower().map(CAPILLARY_REFILL_TEXT)
            value = value.where(~cap, text.astype("float64"))
        value = _convert(chunk["itemid"], value)
        charttime = pd.to_datetime(chunk["charttime"], errors="coerce")
        if window_end is not None:
            inside = charttime < chunk["stay_id"].astype("int64").map(window_end)
            chunk, feature, value, charttime = chunk[inside], feature[inside], value[inside], charttime[inside]
        bad = implausible_values(feature, value)
        if bad.any():
            if implausible is not None:
                for name, n in feature[bad].value_counts().items():
                    implausible[name] = implausible.get(name, 0) + int(n)
            value = value.mask(bad)
        reduced = pd.DataFrame(
            {
                "stay_id": chunk["stay_id"].astype("int64"),
                "charttime": charttime,
                "date": charttime.dt.normalize(),
                "feature": feature,
                "value": value.astype("float64"),
                "priority": chunk["itemid"].map(_ITEM_PRIORITY),
            }
        ).dropna(subset=["value", "charttime"])
        parts.append(reduce_daily(reduced))
        if len(parts) > 16:  # fold the partial results so memory stays at one value per stay-day-variable
            parts = [reduce_daily(pd.concat(parts, ignore_index=True))]
    if not parts:
        return pd.DataFrame(columns=["stay_id", "charttime", "date", "feature", "value", "priority"])
    return reduce_daily(pd.concat(parts, ignore_index=True))


def stay_labels(stays: pd.DataFrame, admissions: pd.DataFrame, patients: pd.DataFrame) -> pd.DataFrame:
    """Add ``mortality``, ``readmission`` (ICU level) and ``readmission_hospital`` to every stay (see the module docstring)."""
    admissions = admissions.sort_values(["subject_id", "admittime"])
    admissions["next_admittime"] = admissions.groupby("subject_id")["admittime"].shift(-1)
    stays = stays.merge(admissions, on=["subject_id", "hadm_id"], how="left").merge(patients, on="subject_id", how="left")
    death_time, dod = stays["deathtime"], stays["dod"]
    by_time = death_time.notna() & (death_time >= stays["admittime"]) & (death_time <= stays["dischtime"])
    by_date = dod.notna() & (dod >= stays["admittime"].dt.normalize()) & (dod <= stays["dischtime"].dt.normalize())
    stays["mortality"] = (by_time | by_date).astype(np.int8)

    window = pd.Timedelta(days=READMISSION_DAYS)
    stays = stays.sort_values(["subject_id", "intime"])
    death_time, dod = stays["deathtime"], stays["dod"]
    next_in = stays.groupby("subject_id")["intime"].shift(-1)
    readmitted = next_in.notna() & (next_in - stays["outtime"] <= window)
    window_end = stays["outtime"] + window
    died = death_time.notna() & (death_time >= stays["intime"]) & (death_time <= window_end)
    died_by_date = death_time.isna() & dod.notna() & (dod >= stays["intime"].dt.normalize()) & (dod <= window_end.dt.normalize())
    stays["readmission"] = (readmitted | died | died_by_date).astype(np.int8)

    next_admission = stays["next_admittime"]
    stays["readmission_hospital"] = (next_admission.notna() & (next_admission - stays["dischtime"] <= window)).astype(np.int8)
    return stays


def _exclusions(stays: pd.DataFrame, has_value: np.ndarray, observation_hours: float | None, readmission_level: str) -> np.ndarray:
    """[N] str: the first rule that excludes each stay ("" = kept), in the order the README lists them."""
    reason = np.full(len(stays), "", dtype=object)

    def mark(rule: np.ndarray, why: str) -> None:
        reason[(reason == "") & rule] = why

    if readmission_level == "hospital":
        mark(stays["mortality"].to_numpy() == 1, DIED_IN_HOSPITAL)
    if observation_hours is not None:
        end = stays["intime"] + pd.Timedelta(hours=observation_hours)
        death = stays["deathtime"].fillna(stays["dod"])  # dod: midnight of the day of death
        mark((death.notna() & (death < end)).to_numpy(), DIED_IN_WINDOW)
        mark((stays["outtime"] < end).to_numpy(), LEFT_IN_WINDOW)
    mark(~has_value, NO_VALUE if observation_hours is None else NO_VALUE_IN_WINDOW)
    return reason.astype(str)


def check_options(chunk_size: int, max_steps: int, observation_hours: float | None, readmission_level: str) -> None:
    """One clear error for a reader option out of range (the MIMIC-IV and MEDS readers share them)."""
    if chunk_size <= 0:
        raise EAGRLInputError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if max_steps <= 0:
        raise EAGRLInputError(f"max_steps must be a positive number of days, got {max_steps}")
    if observation_hours is not None and observation_hours <= 0:
        raise EAGRLInputError(f"observation_hours must be a positive number of hours, got {observation_hours}")
    if readmission_level not in ("icu", "hospital"):
        raise EAGRLInputError(f"readmission_level must be 'icu' or 'hospital', got {readmission_level!r}")


def load_mimic_iv(
    data_dir: Path,
    chunk_size: int = 1_000_000,
    max_steps: int = 8,
    progress: bool = True,
    observation_hours: float | None = None,
    readmission_level: str = "icu",
) -> RawCohort:
    """Every ICU stay of ``data_dir`` (excluded ones with no rows and their reason; see the module docstring).

    ``labels["readmission"]`` follows ``readmission_level`` (``icu`` or ``hospital``).
    """
    check_options(chunk_size, max_steps, observation_hours, readmission_level)
    stays_path, adm_path, pat_path = data_dir / ICUSTAYS, data_dir / ADMISSIONS, data_dir / PATIENTS
    stays = _read_csv(stays_path, ["subject_id", "hadm_id", "stay_id", "intime", "outtime"], "MIMIC-IV icustays")
    _dates(stays, ["intime", "outtime"], stays_path)
    admissions = _read_csv(
        adm_path, ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime"], "MIMIC-IV admissions"
    )
    _dates(admissions, ["admittime", "dischtime", "deathtime"], adm_path)
    patients = _read_csv(pat_path, ["subject_id", "gender", "anchor_age", "anchor_year", "dod"], "MIMIC-IV patients")
    _dates(patients, ["dod"], pat_path)
    stays = stays.dropna(subset=["stay_id", "intime", "outtime"])
    if stays.empty:
        raise EAGRLInputError(f"{stays_path}: no ICU stays with stay_id, intime and outtime: the cohort is empty")
    stays = stay_labels(stays, admissions, patients).sort_values("stay_id").reset_index(drop=True)
    if stays["gender"].isna().any():
        raise EAGRLInputError(f"{pat_path}: {int(stays['gender'].isna().sum())} ICU stay(s) have no patient row")

    stay_ids = stays["stay_id"].astype("int64")
    window_end = None
    if observation_hours is not None:
        window_end = pd.Series((stays["intime"] + pd.Timedelta(hours=observation_hours)).to_numpy(), index=stay_ids.to_numpy())
    implausible: dict[str, int] = {}
    events = read_chartevents(data_dir / CHARTEVENTS, set(stay_ids), chunk_size, progress, window_end, implausible)
    return assemble_stays(
        "mimic_iv", stays, events, stay_ids.astype(str).to_numpy(), max_steps, observation_hours, readmission_level,
        notes={"implausible_values": {name: implausible.get(name, 0) for name in _CHARTED}},
    )


def assemble_stays(
    dataset: str,
    stays: pd.DataFrame,
    events: pd.DataFrame,
    sample_ids: np.ndarray,
    max_steps: int,
    observation_hours: float | None,
    readmission_level: str,
    notes: dict,
) -> RawCohort:
    """The cohort of ICU ``stays`` (sorted by their integer ``stay_id``, as ``sample_ids``; columns stay_id, subject_id, intime, outtime,
    admittime, gender, anchor_age, anchor_year and the labels of ``stay_labels``) from their daily ``events``
    (stay_id, charttime, date, feature, value, priority): days counted from the ``intime`` date (day 1), days up to the
    ``max_steps``-th from last collapsed into it, GCS total from its components, Sex and Age."""
    stay_ids = stays["stay_id"].astype("int64")
    events = events.merge(stays[["stay_id", "intime"]], on="stay_id")
    events["day"] = (events["date"] - events["intime"].dt.normalize()).dt.days.astype("int64") + 1
    # collapse every day up to the max_steps-th-from-last observed day into that day
    uniq = events[["stay_id", "day"]].drop_duplicates().sort_values(["stay_id", "day"])
    uniq["from_end"] = uniq.groupby("stay_id").cumcount(ascending=False)
    first_kept = uniq[uniq["from_end"] == max_steps - 1].set_index("stay_id")["day"]
    floor = events["stay_id"].map(first_kept)
    events["day"] = np.where(floor.notna() & (events["day"] < floor), floor, events["day"]).astype("int64")
    events = last_first(events).drop_duplicates(["stay_id", "day", "feature"], keep="last")
    wide = events.pivot_table(index=["stay_id", "day"], columns="feature", values="value", aggfunc="last")
    wide = wide.reindex(columns=_DYNAMIC).sort_index()
    gcs = wide[list(GCS_COMPONENTS)]
    wide[GCS_TOTAL] = gcs.sum(axis=1, min_count=len(GCS_COMPONENTS))

    counts = wide.groupby(level=0).size().reindex(stay_ids).fillna(0).to_numpy(np.int64)  # 0: no charted value
    exclusion = _exclusions(stays, counts > 0, observation_hours, readmission_level)
    offsets = np.zeros(len(stays) + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    sex = (stays["gender"].astype(str).str.upper() == "M").to_numpy(np.float32)
    age = (stays["anchor_age"] + (stays["admittime"].dt.year - stays["anchor_year"])).to_numpy(np.float32)
    demo = np.repeat(np.stack([sex, age], axis=1), counts, axis=0)
    values = np.concatenate([demo, wide.to_numpy(np.float32)], axis=1)
    readmission = stays["readmission_hospital" if readmission_level == "hospital" else "readmission"]
    return RawCohort(
        dataset=dataset,
        features=MIMIC_FEATURES,
        sample_ids=np.asarray(sample_ids).astype(str),
        patient_ids=stays["subject_id"].astype("int64").astype(str).to_numpy(),
        offsets=offsets,
        values=values,
        days=wide.index.get_level_values(1).to_numpy(np.int32),
        labels={"mortality": stays["mortality"].to_numpy(np.int8), "readmission": readmission.to_numpy(np.int8)},
        exclusion=exclusion,
        notes=notes,
    )
