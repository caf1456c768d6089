"""Reader for a MEDS (Medical Event Data Standard) events table: one sample per ICU stay, as ``mimic_iv``.

MEDS keeps a cohort as one long table of events: ``subject_id``, ``time``, ``code`` and a numeric value (MEDS
names the column ``numeric_value``; the shared MIMIC-IV demo copy calls it ``value``: ``value_column``). This
reader rebuilds what the native MIMIC-IV layout holds in separate tables, then hands it to the same assembly
(``eagrl.data.mimic_iv.assemble_stays``), so the features, days, cohort rules and labels are the native reader's:

- **ICU stays** from the ``ICU_ADMISSION//...`` and ``ICU_DISCHARGE//...`` codes: per subject, each admission
  with the first discharge after it (and before the subject's next admission). Unpaired codes are counted.
  MEDS has no stay id: a stay's id is ``<subject_id>@<intime>`` (ISO time).
- **Hospital admissions** from ``HOSPITAL_ADMISSION//...`` and ``HOSPITAL_DISCHARGE//...``, paired the same
  way. A stay belongs to the admission of its subject with ``admittime <= intime <= dischtime`` (else the
  latest one admitted before ``intime``; a stay with none is counted and takes its own times).
- **Death** from ``MEDS_DEATH``: it is that admission's ``deathtime`` when it falls within an admission of the
  subject (an in-hospital death, as ``admissions.deathtime``), and the subject's date of death (``dod``) always.
- **Sex** from ``GENDER//M`` / ``GENDER//F``; **Age** is the admission year minus the year of ``MEDS_BIRTH``.
- **Features**: the mapping file names, per code, one of the 17 MIMIC-IV variables and a unit conversion. The
  shipped mapping (``meds_mimic_iv_chartevents.csv``) covers MIMIC-IV's chartevents codes ``LAB//<itemid>//<unit>``
  with the native reader's itemids and conversions. An event belongs to the stay of its subject with
  ``intime <= time <= outtime``.
- **Labels**: from the stay rules of ``mimic_iv`` (mortality, readmission at ICU or hospital level), or, for
  the task asked, from a MEDS label file (``subject_id``, ``prediction_time``, ``boolean_value``): a label row
  labels the stay of its subject whose ``intime <= prediction_time <= outtime``; a stay with no label row
  leaves the cohort (counted).

Both passes over the events table read it in record batches of ``chunk_size`` rows, only the needed columns,
so memory follows the chunk and the number of stay-days, not the table.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from eagrl.data.cohort import RawCohort
from eagrl.data.features import MIMIC_VARIABLES
from eagrl.data.mimic_iv import CONVERSIONS, assemble_stays, check_options, convert_units, implausible_values, reduce_daily, stay_labels
from eagrl.errors import EAGRLInputError
from eagrl.paths import require_file

MIMIC_CHARTEVENTS_MAPPING = "meds_mimic_iv_chartevents.csv"  # shipped beside this module
ICU_IN, ICU_OUT, HOSP_IN, HOSP_OUT = "ICU_ADMISSION", "ICU_DISCHARGE", "HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE"
DEATH, BIRTH, GENDER = "MEDS_DEATH", "MEDS_BIRTH", "GENDER"
NO_LABEL = "no row in the label file"
_STRUCTURE = (ICU_IN, ICU_OUT, HOSP_IN, HOSP_OUT, DEATH, BIRTH, GENDER)
_CHARTED = [v.spec.name for v in MIMIC_VARIABLES if v.itemids]


def mapping_path(path: str | Path | None) -> Path:
    """The mapping file: ``path``, or the shipped MIMIC-IV chartevents mapping when None."""
    if path is None:
        return Path(str(resources.files("eagrl.data") / MIMIC_CHARTEVENTS_MAPPING))
    return Path(path).expanduser()


def read_mapping(path: Path) -> tuple[dict[str, tuple[str, str, int]], dict[str, tuple[str, str, int]]]:
    """``(exact, prefixes)``: code -> (feature, conversion, priority) from a CSV with columns ``code,feature,conversion``.
    A code ending in ``*`` matches every code that starts with the rest (``LAB//220045//*``: any unit). Priority:
    the row's rank among its feature's rows (two codes of a feature at one time: the earlier row's value is kept)."""
    require_file(path, "MEDS code mapping")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, comment="#")
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as CSV ({err})") from err
    for column in ("code", "feature", "conversion"):
        if column not in table.columns:
            raise EAGRLInputError(f"{path}: missing required column {column!r} (expected columns code,feature,conversion)")
    known = set(_CHARTED)
    bad = sorted(set(table["feature"]) - known)
    if bad:
        raise EAGRLInputError(f"{path}: column 'feature' names {bad[:3]}, which are not MIMIC-IV variables (expected one of {sorted(known)})")
    odd = sorted(set(table["conversion"]) - {"", *CONVERSIONS})
    if odd:
        raise EAGRLInputError(f"{path}: column 'conversion' holds {odd[:3]} (expected empty or one of {list(CONVERSIONS)})")
    exact, prefixes, rank = {}, {}, {}
    for code, feature, conversion in table[["code", "feature", "conversion"]].itertuples(index=False):
        rank[feature] = rank.get(feature, -1) + 1  # at one time, a feature's earlier row wins (mimic_iv.last_first)
        (prefixes if code.endswith("*") else exact)[code.rstrip("*")] = (feature, conversion, rank[feature])
    return exact, prefixes


def _match(codes: pd.Series, exact: dict, prefixes: dict) -> pd.DataFrame:
    """[n] feature, conversion and priority of each code (NaN where unmapped)."""
    unique = pd.Series(codes.unique())
    found = {}
    for code in unique:
        hit = exact.get(code)
        if hit is None:
            hit = next((v for p, v in prefixes.items() if code.startswith(p)), None)
        if hit is not None:
            found[code] = hit
    feature = codes.map({c: f for c, (f, _, _) in found.items()})
    conversion = codes.map({c: v for c, (_, v, _) in found.items()})
    priority = codes.map({c: r for c, (_, _, r) in found.items()})
    return pd.DataFrame({"feature": feature, "conversion": conversion, "priority": priority})


def _batches(path: Path, columns: list[str], chunk_size: int, progress: bool, desc: str):
    """The events table in record batches of ``chunk_size`` rows, as pandas frames of ``columns``."""
    import pyarrow.parquet as pq

    require_file(path, "MEDS events table")
    try:
        table = pq.ParquetFile(path)
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as a parquet table ({type(err).__name__}: {err})") from err
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise EAGRLInputError(f"{path}: missing required column(s) {missing} (found {table.schema_arrow.names}; data.meds_value_column names the value column)")
    total = -(-table.metadata.num_rows // chunk_size)
    for batch in tqdm(table.iter_batches(batch_size=chunk_size, columns=columns), desc=desc, total=total, unit="chunk", disable=not progress, leave=False):
        yield batch.to_pandas()


def _pairs(starts: pd.DataFrame, ends: pd.DataFrame, start: str, end: str) -> tuple[pd.DataFrame, int]:
    """Per subject, each start with the first end after it and before the subject's next start.
    starts/ends: subject_id, time. Returns (subject_id, start, end) rows and the count of unpaired codes."""
    starts = starts.sort_values(["subject_id", "time"]).rename(columns={"time": start})
    starts["next_start"] = starts.groupby("subject_id")[start].shift(-1)
    ends = ends.sort_values(["time", "subject_id"]).rename(columns={"time": end})
    paired = pd.merge_asof(starts.sort_values(start), ends, left_on=start, right_on=end, by="subject_id", direction="forward")
    ok = paired[end].notna() & (paired["next_start"].isna() | (paired[end] <= paired["next_start"]))
    paired = paired[ok].drop_duplicates(["subject_id", end], keep="first")
    unpaired = (len(starts) - len(paired)) + (len(ends) - len(paired))
    return paired[["subject_id", start, end]].sort_values(["subject_id", start]).reset_index(drop=True), int(unpaired)


def _structure(path: Path, chunk_size: int, progress: bool) -> dict[str, pd.DataFrame]:
    """First pass: the rows of the stay, admission, death, birth and sex codes, by code family."""
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in _STRUCTURE}
    for chunk in _batches(path, ["subject_id", "time", "code"], chunk_size, progress, "MEDS codes"):
        family = chunk["code"].str.split("//", n=1).str[0]
        for name in _STRUCTURE:
            rows = chunk[family == name]
            if not rows.empty:
                parts[name].append(rows)
    return {name: pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["subject_id", "time", "code"]) for name, rows in parts.items()}


def _stays(path: Path, found: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """(stays, admissions, patients) in the native tables' columns, and notes on what could not be joined."""
    stays, unpaired_icu = _pairs(found[ICU_IN][["subject_id", "time"]], found[ICU_OUT][["subject_id", "time"]], "intime", "outtime")
    if stays.empty:
        raise EAGRLInputError(f"{path}: no {ICU_IN}//... code with a later {ICU_OUT}//... code: no ICU stay, the cohort is empty")
    admissions, unpaired_hosp = _pairs(found[HOSP_IN][["subject_id", "time"]], found[HOSP_OUT][["subject_id", "time"]], "admittime", "dischtime")
    admissions["hadm_id"] = np.arange(len(admissions), dtype=np.int64)

    # a stay's admission: the one holding its intime, else the latest one admitted before it
    candidates = stays.reset_index().merge(admissions, on="subject_id", how="left")
    holds = (candidates["admittime"] <= candidates["intime"]) & (candidates["intime"] <= candidates["dischtime"])
    before = candidates["admittime"] <= candidates["intime"]
    candidates["rank"] = np.where(holds, 0, np.where(before, 1, 2))
    best = candidates.sort_values(["index", "rank", "admittime"], ascending=[True, True, False]).drop_duplicates("index")
    best = best.set_index("index").sort_index()
    stays["hadm_id"] = np.where(best["rank"] < 2, best["hadm_id"], -1 - np.arange(len(stays))).astype(np.int64)
    own = stays.loc[stays["hadm_id"] < 0, ["subject_id", "hadm_id", "intime", "outtime"]]  # no admission: the stay's own times
    admissions = pd.concat([admissions, own.rename(columns={"intime": "admittime", "outtime": "dischtime"})], ignore_index=True)

    deaths = found[DEATH].sort_values("time").drop_duplicates("subject_id", keep="last")[["subject_id", "time"]]
    within = admissions.merge(deaths, on="subject_id")
    within = within[(within["time"] >= within["admittime"]) & (within["time"] <= within["dischtime"])]
    admissions["deathtime"] = admissions["hadm_id"].map(within.drop_duplicates("hadm_id").set_index("hadm_id")["time"])

    births = found[BIRTH].sort_values("time").drop_duplicates("subject_id")[["subject_id", "time"]]
    gender = found[GENDER].drop_duplicates("subject_id", keep="last")
    patients = pd.DataFrame({"subject_id": pd.unique(stays["subject_id"])})
    patients["gender"] = patients["subject_id"].map(gender.set_index("subject_id")["code"].str.split("//").str[-1])
    patients["anchor_year"] = patients["subject_id"].map(births.set_index("subject_id")["time"].dt.year)
    patients["anchor_age"] = 0  # Age = admission year - birth year (stay_labels' anchor arithmetic)
    patients["dod"] = patients["subject_id"].map(deaths.set_index("subject_id")["time"].dt.normalize())
    for column, what in (("gender", f"{GENDER}//M or //F"), ("anchor_year", BIRTH)):
        if patients[column].isna().any():
            raise EAGRLInputError(f"{path}: {int(patients[column].isna().sum())} subject(s) with an ICU stay have no {what} code")
    notes = {"unpaired_icu_codes": unpaired_icu, "unpaired_hospital_codes": unpaired_hosp, "stays_without_admission": int(len(own))}
    return stays, admissions, patients, notes


def _events(path, value_column, stays, exact, prefixes, chunk_size, progress, window_end, implausible) -> pd.DataFrame:
    """Second pass: the daily last value per (stay_id, date, feature) of the mapped codes (see read_chartevents)."""
    by_subject = stays[["subject_id", "stay_id", "intime", "outtime"]]
    parts: list[pd.DataFrame] = []
    for chunk in _batches(path, ["subject_id", "time", "code", value_column], chunk_size, progress, "MEDS events"):
        mapped = _match(chunk["code"], exact, prefixes)
        keep = mapped["feature"].notna().to_numpy() & chunk[value_column].notna().to_numpy()
        if not keep.any():
            continue
        chunk = chunk[keep].assign(**{k: mapped[k][keep].to_numpy() for k in ("feature", "conversion", "priority")})
        chunk = chunk.merge(by_subject, on="subject_id")
        chunk = chunk[(chunk["time"] >= chunk["intime"]) & (chunk["time"] <= chunk["outtime"])]
        if window_end is not None:
            chunk = chunk[chunk["time"] < chunk["stay_id"].map(window_end)]
        value = convert_units(chunk["conversion"].replace("", np.nan), chunk[value_column].astype("float64"))
        bad = implausible_values(chunk["feature"], value)
        for name, n in chunk.loc[bad, "feature"].value_counts().items():
            implausible[name] = implausible.get(name, 0) + int(n)
        reduced = pd.DataFrame(
            {"stay_id": chunk["stay_id"], "charttime": chunk["time"], "date": chunk["time"].dt.normalize(), "feature": chunk["feature"],
             "value": value.mask(bad), "priority": chunk["priority"]}  # fmt: skip
        ).dropna(subset=["value", "charttime"])
        parts.append(reduce_daily(reduced))
        if len(parts) > 16:
            parts = [reduce_daily(pd.concat(parts, ignore_index=True))]
    if not parts:
        return pd.DataFrame(columns=["stay_id", "charttime", "date", "feature", "value", "priority"])
    return reduce_daily(pd.concat(parts, ignore_index=True))


def _label_file(path: Path, stays: pd.DataFrame) -> tuple[np.ndarray, int]:
    """[N] label per stay from a MEDS label file (-1: no row), and the count of rows that match no stay."""
    require_file(path, "MEDS label file")
    try:
        table = pd.read_parquet(path) if path.suffix != ".csv" else pd.read_csv(path)
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as a MEDS label table ({type(err).__name__}: {err})") from err
    missing = [c for c in ("subject_id", "prediction_time", "boolean_value") if c not in table.columns]
    if missing:
        raise EAGRLInputError(f"{path}: missing required column(s) {missing} (a MEDS label file has subject_id, prediction_time, boolean_value)")
    table = table.assign(prediction_time=pd.to_datetime(table["prediction_time"]), row=np.arange(len(table)))
    joined = table.merge(stays[["subject_id", "stay_id", "intime", "outtime"]].reset_index(), on="subject_id")
    joined = joined[(joined["prediction_time"] >= joined["intime"]) & (joined["prediction_time"] <= joined["outtime"])]
    label = np.full(len(stays), -1, np.int8)
    label[joined["index"].to_numpy()] = joined["boolean_value"].astype(bool).to_numpy(np.int8)
    return label, int(len(table) - joined["row"].nunique())


def load_meds(
    events_file: Path,
    value_column: str = "numeric_value",
    mapping_file: Path | None = None,
    label_file: Path | None = None,
    task: str = "mortality",
    chunk_size: int = 1_000_000,
    max_steps: int = 8,
    progress: bool = True,
    observation_hours: float | None = None,
    readmission_level: str = "icu",
) -> RawCohort:
    """Every ICU stay of a MEDS events table (excluded ones with no rows and their reason; see the module docstring)."""
    check_options(chunk_size, max_steps, observation_hours, readmission_level)
    exact, prefixes = read_mapping(mapping_path(mapping_file))
    found = _structure(events_file, chunk_size, progress)
    stays, admissions, patients, notes = _stays(events_file, found)
    stays = stay_labels(stays, admissions, patients).sort_values(["subject_id", "intime"]).reset_index(drop=True)
    stays["stay_id"] = np.arange(len(stays), dtype=np.int64)  # sorted as the sample ids below
    sample_ids = (stays["subject_id"].astype("int64").astype(str) + "@" + stays["intime"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_numpy()
    window_end = None
    if observation_hours is not None:
        window_end = pd.Series((stays["intime"] + pd.Timedelta(hours=observation_hours)).to_numpy(), index=stays["stay_id"].to_numpy())
    implausible: dict[str, int] = {}
    events = _events(events_file, value_column, stays, exact, prefixes, chunk_size, progress, window_end, implausible)
    notes["implausible_values"] = {name: implausible.get(name, 0) for name in _CHARTED}
    cohort = assemble_stays("meds", stays, events, sample_ids, max_steps, observation_hours, readmission_level, notes)
    if label_file is not None:
        label, unmatched = _label_file(Path(label_file), stays)
        cohort.labels[task] = np.maximum(label, 0).astype(np.int8)
        cohort.exclusion = np.where((cohort.exclusion == "") & (label < 0), NO_LABEL, cohort.exclusion).astype(str)
        cohort.notes.update(labels=f"{task} from {Path(label_file).name}", label_rows_without_stay=unmatched)
    return cohort
