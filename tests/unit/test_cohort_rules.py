"""The cohort rules on small hand-made tables whose right answer is known: labels, the observation window,
exclusions, plausibility, capillary refill spellings, TJH rows after discharge, split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eagrl.data import mimic_iv, tjh
from eagrl.data.features import TJH_LABS
from eagrl.data.preprocess import read_split_file
from eagrl.errors import EAGRLInputError

T0 = pd.Timestamp("2150-01-01 08:00")
HR, CAP, TEMP = 220045, 223951, 223762  # heart rate, capillary refill, temperature (°C)


def _h(hours: float) -> str:
    return str(T0 + pd.Timedelta(hours=hours))


def _write(root: Path, name: str, rows: list[dict], columns: list[str]) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False, compression="gzip")


def mimic_folder(root: Path) -> Path:
    """Six patients, eight ICU stays, each built for one rule (times in hours from T0):

    - stay 11 (patient 1): dies in the ICU at 60 h                    -> mortality 1, readmission 1
    - stays 21, 22 (patient 2): one admission, back in the ICU 5 days after leaving it
                                                                     -> 21: readmission 1 (ICU level), 0 (hospital)
    - stay 31 (patient 3): discharged, dies 10 days later (dod only)  -> mortality 0, readmission 1
    - stay 41 (patient 4): survives, a new admission 20 days after discharge, the next ICU stay 32 days
      after leaving the ICU                                           -> ICU level 0, hospital level 1
    - stay 42 (patient 4): in that second admission, survives         -> 0 everywhere
    - stay 51 (patient 5): leaves the ICU after 24 h                   -> excluded under a 48 h window
    - stay 61 (patient 6): no charted value at all                     -> excluded
    """
    day = 24
    patients = [
        {"subject_id": s, "gender": "M" if s % 2 else "F", "anchor_age": 60, "anchor_year": 2150, "dod": dod}
        for s, dod in [(1, "2150-01-03"), (2, None), (3, str((T0 + pd.Timedelta(days=17)).date())), (4, None), (5, None), (6, None)]
    ]
    admissions = [
        {"subject_id": 1, "hadm_id": 100, "admittime": _h(-2), "dischtime": _h(60), "deathtime": _h(60)},
        {"subject_id": 2, "hadm_id": 200, "admittime": _h(-2), "dischtime": _h(20 * day), "deathtime": None},
        {"subject_id": 3, "hadm_id": 300, "admittime": _h(-2), "dischtime": _h(7 * day), "deathtime": None},
        {"subject_id": 4, "hadm_id": 400, "admittime": _h(-2), "dischtime": _h(6 * day), "deathtime": None},
        {"subject_id": 4, "hadm_id": 401, "admittime": _h(26 * day), "dischtime": _h(40 * day), "deathtime": None},
        {"subject_id": 5, "hadm_id": 500, "admittime": _h(-2), "dischtime": _h(5 * day), "deathtime": None},
        {"subject_id": 6, "hadm_id": 600, "admittime": _h(-2), "dischtime": _h(5 * day), "deathtime": None},
    ]
    stays = [
        {"subject_id": 1, "hadm_id": 100, "stay_id": 11, "intime": _h(0), "outtime": _h(60)},
        {"subject_id": 2, "hadm_id": 200, "stay_id": 21, "intime": _h(0), "outtime": _h(3 * day)},
        {"subject_id": 2, "hadm_id": 200, "stay_id": 22, "intime": _h(8 * day), "outtime": _h(11 * day)},
        {"subject_id": 3, "hadm_id": 300, "stay_id": 31, "intime": _h(0), "outtime": _h(4 * day)},
        {"subject_id": 4, "hadm_id": 400, "stay_id": 41, "intime": _h(0), "outtime": _h(4 * day)},
        {"subject_id": 4, "hadm_id": 401, "stay_id": 42, "intime": _h(36 * day), "outtime": _h(38 * day)},
        {"subject_id": 5, "hadm_id": 500, "stay_id": 51, "intime": _h(0), "outtime": _h(24)},
        {"subject_id": 6, "hadm_id": 600, "stay_id": 61, "intime": _h(0), "outtime": _h(4 * day)},
    ]
    events = []
    for stay in stays:
        if stay["stay_id"] == 61:
            continue
        start = pd.Timestamp(stay["intime"])
        for hours, value in ((1, 80.0), (30, 90.0)):
            events.append({"stay_id": stay["stay_id"], "charttime": str(start + pd.Timedelta(hours=hours)), "itemid": HR, "value": "", "valuenum": value})
    # stay 31: a heart rate of 150 after 48 h (outside a 48 h window) and an impossible 400 inside it
    events.append({"stay_id": 31, "charttime": _h(50), "itemid": HR, "value": "", "valuenum": 150.0})
    events.append({"stay_id": 31, "charttime": _h(31), "itemid": HR, "value": "", "valuenum": 400.0})
    events.append({"stay_id": 31, "charttime": _h(2), "itemid": TEMP, "value": "", "valuenum": 12.0})  # impossible
    # capillary refill in MetaVision's and CareVue's spellings (text only, no valuenum)
    events.append({"stay_id": 41, "charttime": _h(2), "itemid": CAP, "value": "Abnormal >3 Seconds", "valuenum": None})
    events.append({"stay_id": 21, "charttime": _h(2), "itemid": CAP, "value": "Normal <3 Seconds", "valuenum": None})
    events.append({"stay_id": 42, "charttime": _h(36 * day + 2), "itemid": CAP, "value": "Normal <3 secs", "valuenum": None})
    for event in events:
        stay = next(s for s in stays if s["stay_id"] == event["stay_id"])
        event.update(subject_id=stay["subject_id"], hadm_id=stay["hadm_id"])
    _write(root, "hosp/patients.csv.gz", patients, ["subject_id", "gender", "anchor_age", "anchor_year", "dod"])
    _write(root, "hosp/admissions.csv.gz", admissions, ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime"])
    _write(root, "icu/icustays.csv.gz", stays, ["subject_id", "hadm_id", "stay_id", "intime", "outtime"])
    _write(root, "icu/chartevents.csv.gz", events, ["subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value", "valuenum"])
    return root


def _by_stay(cohort, what: str) -> dict[str, object]:
    values = cohort.labels[what] if what in cohort.labels else getattr(cohort, what)
    return {sid: (v.item() if hasattr(v, "item") else v) for sid, v in zip(cohort.sample_ids, values)}


def _last_value(cohort, stay: str, feature: str) -> float:
    k = list(cohort.sample_ids).index(stay)
    column = cohort.values[cohort.rows(k), cohort.feature_names.index(feature)]
    measured = column[~np.isnan(column)]
    return float(measured[-1]) if measured.size else float("nan")


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory) -> Path:
    return mimic_folder(tmp_path_factory.mktemp("mimic"))


def test_mimic_labels_icu_level(mimic_root):
    cohort = mimic_iv.load_mimic_iv(mimic_root, progress=False)
    assert _by_stay(cohort, "mortality") == {"11": 1, "21": 0, "22": 0, "31": 0, "41": 0, "42": 0, "51": 0, "61": 0}
    # an ICU death, a return within the same admission, a death 10 days after discharge
    assert _by_stay(cohort, "readmission") == {"11": 1, "21": 1, "22": 0, "31": 1, "41": 0, "42": 0, "51": 0, "61": 0}
    assert _by_stay(cohort, "exclusion") == {**{s: "" for s in ("11", "21", "22", "31", "41", "42", "51")}, "61": mimic_iv.NO_VALUE}


def test_mimic_labels_hospital_level(mimic_root):
    cohort = mimic_iv.load_mimic_iv(mimic_root, progress=False, readmission_level="hospital")
    readmission = _by_stay(cohort, "readmission")
    assert readmission["21"] == 0 and readmission["41"] == 1 and readmission["31"] == 0  # a new admission counts, an ICU return does not
    assert _by_stay(cohort, "exclusion")["11"] == mimic_iv.DIED_IN_HOSPITAL


def test_mimic_observation_window(mimic_root):
    whole = mimic_iv.load_mimic_iv(mimic_root, progress=False)
    window = mimic_iv.load_mimic_iv(mimic_root, progress=False, observation_hours=48)
    reasons = _by_stay(window, "exclusion")
    assert reasons["51"] == mimic_iv.LEFT_IN_WINDOW  # left the ICU at 24 h
    assert reasons["61"] == mimic_iv.NO_VALUE_IN_WINDOW
    assert reasons["11"] == "" and reasons["31"] == ""  # the death at 60 h falls after the window: kept
    assert _last_value(whole, "31", "Heart rate") == 150.0  # the whole stay reads the value at 50 h
    assert _last_value(window, "31", "Heart rate") == 90.0  # the window never sees it
    k = list(window.sample_ids).index("31")
    assert window.days[window.rows(k)].max() <= 3  # 48 h from 08:00 spans calendar days 1-3
    died = mimic_iv.load_mimic_iv(mimic_root, progress=False, observation_hours=72)
    assert _by_stay(died, "exclusion")["11"] == mimic_iv.DIED_IN_WINDOW  # an outcome inside the window


def test_mimic_impossible_values_become_missing_and_are_counted(mimic_root):
    cohort = mimic_iv.load_mimic_iv(mimic_root, progress=False)
    assert cohort.notes["implausible_values"]["Heart rate"] == 1 and cohort.notes["implausible_values"]["Temperature"] == 1
    k = list(cohort.sample_ids).index("31")
    heart = cohort.values[cohort.rows(k), cohort.feature_names.index("Heart rate")]
    assert 400.0 not in heart and np.nanmax(heart) == 150.0
    assert np.isnan(cohort.values[cohort.rows(k), cohort.feature_names.index("Temperature")]).all()


def test_mimic_capillary_refill_metavision_and_carevue_spellings(mimic_root):
    cohort = mimic_iv.load_mimic_iv(mimic_root, progress=False)
    assert _last_value(cohort, "41", "Capillary refill rate") == 1.0  # "Abnormal >3 Seconds"
    assert _last_value(cohort, "21", "Capillary refill rate") == 0.0  # "Normal <3 Seconds"
    assert _last_value(cohort, "42", "Capillary refill rate") == 0.0  # "Normal <3 secs" (CareVue)


def test_the_datamodule_applies_the_rules_and_summary_counts_them(mimic_root, tmp_path):
    from datamodules import EHRDataModule

    split = tmp_path / "split.csv"
    split.write_text("id,patient,split\n" + "".join(f"{s},{s[0]},{'test' if s[0] in '35' else 'val' if s[0] in '46' else 'train'}\n"
                                                    for s in ("11", "21", "22", "31", "41", "42", "51", "61")))  # fmt: skip
    common = dict(dataset="mimic_iv", mimic_dir=str(mimic_root), cache_dir=str(tmp_path / "cache"), progress=False, split="file", split_file=str(split))
    whole = EHRDataModule(task="readmission", **common).summary()
    assert whole["splits"]["val"]["excluded"] == {mimic_iv.NO_VALUE: 1} and whole["splits"]["val"]["samples"] == 2
    assert whole["splits"]["train"]["positives"] == 2 and whole["readmission_level"] == "icu"
    window = EHRDataModule(task="mortality", observation_hours=48, **common).summary()
    assert window["observation_window"]["observation_hours"] == 48
    assert window["splits"]["test"] == {"patients": 1, "samples": 1, "positives": 0, "before_exclusions": 2,
                                        "excluded": {mimic_iv.LEFT_IN_WINDOW: 1}}  # fmt: skip
    assert window["excluded_by_cause"] == {mimic_iv.LEFT_IN_WINDOW: 1, mimic_iv.NO_VALUE_IN_WINDOW: 1}
    written = pd.read_csv(window["split_file"], dtype=str)
    assert list(written.columns) == ["id", "patient", "split"] and len(written) == 8  # every stay, excluded ones too


def test_one_split_for_both_mimic_tasks(mimic_module, session_cache):
    from datamodules import EHRDataModule

    readmission = EHRDataModule(dataset="mimic_iv", task="readmission", cache_dir=str(session_cache), progress=False)
    readmission.setup()
    assert (readmission.cohort.split == mimic_module.cohort.split).all()
    assert list(readmission.cohort.raw.sample_ids) == list(mimic_module.cohort.raw.sample_ids)
    again = EHRDataModule(dataset="mimic_iv", task="mortality", cache_dir=str(session_cache), progress=False,
                          split="file", split_file=readmission.summary()["split_file"])  # fmt: skip
    again.setup()
    assert (again.cohort.split == mimic_module.cohort.split).all()  # the written file reproduces the split


@pytest.mark.parametrize(
    "options, key",
    [
        (dict(dataset="mimic_iv", task="readmission", observation_hours=48), "observation_hours"),
        (dict(dataset="tjh", observation_hours=48), "observation_hours"),
        (dict(dataset="mimic_iv", task="mortality", readmission_level="hospital"), "readmission_level"),
        (dict(dataset="tjh", split="file"), "split_file"),
    ],
)
def test_a_window_or_level_that_does_not_apply_names_the_key(options, key):
    from datamodules import EHRDataModule

    with pytest.raises(EAGRLInputError, match=f"data.{key}"):
        EHRDataModule(**options)


# ---------------------------------------------------------------------------------------------- TJH
def tjh_file(root: Path) -> Path:
    """Three patients (times: days from 2020-02-01):

    - 1: records on days 0, 1, 3 and one on day 6, after its discharge on day 5 (dropped); survives
    - 2: every record on day 4, the day after its discharge on day 3: excluded
    - 3: records on days 0 and 1, dies on day 1 (before a 2-day window closes)
    """
    start = pd.Timestamp("2020-02-01 09:00")
    rows = []
    for patient, days, discharge, outcome in ((1, [0, 1, 3, 6], 5, 0), (2, [4], 3, 0), (3, [0, 1], 1, 1)):
        for k, d in enumerate(days):
            row = {name: np.nan for name, _, _ in TJH_LABS}
            row.update({"PATIENT_ID": patient if k == 0 else np.nan, "RE_DATE": start + pd.Timedelta(days=d, hours=k),
                        "age": 50 + patient, "gender": 1, "Admission time": start, "outcome": outcome,
                        "Discharge time": start + pd.Timedelta(days=discharge, hours=8),
                        "White blood cell count": 5.0 + d, "2019-nCoV nucleic acid detection": -1})  # fmt: skip
            rows.append(row)
    path = root / "tjh" / "raw" / "hand_made.xlsx"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_excel(path, index=False)
    return path


@pytest.fixture(scope="module")
def tjh_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tjh")
    tjh_file(root)
    return root


def test_tjh_rows_after_discharge_are_dropped(tjh_root):
    cohort = tjh.load_tjh(tjh_root, raw_file="tjh/raw/hand_made.xlsx")
    assert cohort.notes == {"rows_after_discharge": 2, "patients_with_rows_after_discharge": 2}
    assert _by_stay(cohort, "exclusion") == {"1": "", "2": tjh.ALL_AFTER_DISCHARGE, "3": ""}
    k = list(cohort.sample_ids).index("1")
    assert list(cohort.days[cohort.rows(k)]) == [1, 2, 4]  # day 7 (after discharge) is gone
    assert _last_value(cohort, "1", "White blood cell count") == 8.0  # the last day read is day 4, not day 7


def test_tjh_observation_window(tjh_root):
    cohort = tjh.load_tjh(tjh_root, observation_days=2, raw_file="tjh/raw/hand_made.xlsx")
    assert _by_stay(cohort, "exclusion") == {"1": "", "2": tjh.ALL_AFTER_DISCHARGE, "3": tjh.DIED_IN_WINDOW}
    k = list(cohort.sample_ids).index("1")
    assert list(cohort.days[cohort.rows(k)]) == [1, 2]  # nothing after day 2 reaches the features
    assert _last_value(cohort, "1", "White blood cell count") == 6.0


def test_tjh_split_file_ids_are_checked(tjh_root, tmp_path):
    cohort = tjh.load_tjh(tjh_root, raw_file="tjh/raw/hand_made.xlsx")
    good = tmp_path / "good.csv"
    good.write_text("PATIENT_ID,split\n1,train\n2,test\n3,val\n")
    assert list(read_split_file(good, cohort)) == ["train", "test", "val"]
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("PATIENT_ID,split\n1,train\n2,test\n3,val\n99,test\n")
    with pytest.raises(EAGRLInputError, match="not in the tjh cohort, e.g. '99'"):
        read_split_file(unknown, cohort)


def test_tjh_published_split_counts_are_checked(tjh_copy):
    cohort = tjh.load_tjh(tjh_copy)
    split = tjh.published_split(tjh_copy, cohort)
    assert {s: int((split == s).sum()) for s in ("train", "val", "test")} == tjh.PUBLISHED_COUNTS
    path = tjh_copy / tjh.SPLIT_FILE
    table = pd.read_csv(path)
    table.loc[(table["split"] == "test") & (table.index % 7 == 0), "split"] = "train"  # the file no longer the published one
    table.to_csv(path, index=False)
    with pytest.raises(EAGRLInputError, match="the published split has"):
        tjh.published_split(tjh_copy, cohort)


def test_the_hospital_level_asks_the_llm_another_question(mimic_root, tmp_path):
    from datamodules import EHRDataModule

    common = dict(dataset="mimic_iv", task="readmission", mimic_dir=str(mimic_root), cache_dir=str(tmp_path), progress=False)
    icu, hospital = EHRDataModule(**common), EHRDataModule(readmission_level="hospital", **common)
    assert icu.question == "readmission" and hospital.question == "readmission_hospital"
    assert "ICU" in icu.system_prompt and "admitted to hospital again" in hospital.system_prompt
