"""External cohorts in the TJH schema (issue 18): ``cohort_file``, ``split: all`` with the training statistics of a
checkpoint, ``allow_missing_features``, other date formats and the unit check. The files are made up by code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules import EHRDataModule
from datamodules.ehr import unit_warnings
from eagrl.data import tjh
from eagrl.data.cohort import NormStats
from eagrl.errors import EAGRLInputError

LABS = ["LDH", "hs-CRP", "lymphocyte %"]
NAMES = ["Sex", "Age", "(%)lymphocyte", "Lactate dehydrogenase", "High sensitivity C-reactive protein"]  # the dataset's order


def _cohort_file(path: Path, dates: list[str], with_demographics: bool = False) -> Path:
    rows = []
    for p, date in enumerate(dates):
        row = {"PATIENT_ID": 7 + p, "RE_DATE": date, "outcome": p % 2, "Lactate dehydrogenase": 200.0 + 100 * p,
               "High sensitivity C-reactive protein": 3.0 + p, "(%)lymphocyte": 30.0 - p}  # fmt: skip
        if with_demographics:
            row.update(age=50 + p, gender=1 + p % 2)
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _module(path: Path, cache: Path, **kwargs) -> EHRDataModule:
    options = {"features": LABS, "cohort_file": str(path), "split": "all", "allow_missing_features": True}
    return EHRDataModule(dataset="tjh", cache_dir=str(cache), progress=False, **{**options, **kwargs})


def _stats() -> dict:
    return {"dataset": "tjh", "features": NAMES, "mean": [0.0, 60.0, 20.0, 300.0, 40.0], "std": [1.0, 15.0, 10.0, 100.0, 50.0],
            "median": [1.0, 62.0, 18.0, 280.0, 30.0]}  # fmt: skip


def test_split_all_normalises_with_the_checkpoint_statistics(tmp_path):
    dm = _module(_cohort_file(tmp_path / "c.csv", ["2020/02/03 10:00", "2020/02/04 11:30", "2020/02/05 09:00"]), tmp_path / "cache")
    dm.setup("test")
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 0, "val": 0, "test": 3}
    with pytest.raises(EAGRLInputError, match="this checkpoint does not hold them"):
        dm.require_training_statistics()
    assert dm.state_dict() == {}  # nothing of its own to keep: its statistics are not training statistics
    dm.load_state_dict({"training_statistics": _stats()})  # what Lightning does with --ckpt_path
    dm.require_training_statistics()
    item = dm.datasets["test"][1]
    stats = _stats()
    ldh = NAMES.index("Lactate dehydrogenase")
    assert item["x"][0, ldh] == pytest.approx((300.0 - stats["mean"][ldh]) / stats["std"][ldh])  # training mean/std, not the cohort's
    age = NAMES.index("Age")
    assert item["x"][0, age] == pytest.approx((62.0 - 60.0) / 15.0) and item["missing"][0, age]  # absent: the training median
    assert np.isnan(item["raw"][0, age])
    assert dm.state_dict() == {"training_statistics": stats}  # a checkpoint saved from this run keeps them


def test_absent_features_are_named_left_out_of_the_text_and_reported(tmp_path):
    dm = _module(_cohort_file(tmp_path / "c.csv", ["2020-02-03", "2020-02-04"]), tmp_path / "cache", features=None)
    with pytest.warns(UserWarning, match=r"lacks 72 of the model's 75 features .*4% of the model's features are present"):
        dm.setup("test")
    assert dm.input_report["data/features_present"] == pytest.approx(3 / 75)
    assert "Sex" in dm.input_report["data/absent_features"] and "albumin" in dm.input_report["data/absent_features"]
    again = _module(tmp_path / "c.csv", tmp_path / "cache", features=None)
    with pytest.warns(UserWarning, match="lacks 72 of the model's 75 features"):
        again.setup("test")  # loaded from the cache: still named and reported
    assert again.input_report == dm.input_report
    text = dm.datasets["test"].text(0)
    assert "Lactate dehydrogenase" in text and "albumin" not in text and "unknown sex" in text
    full = EHRDataModule(dataset="tjh", progress=False, cache_dir=str(tmp_path / "cache"))
    full.setup("test")
    assert "albumin" in full.datasets["test"].text(0, style="paper")  # the shipped cohort's text keeps every feature


def test_a_lacking_column_without_the_option_is_one_error_naming_it(tmp_path):
    path = _cohort_file(tmp_path / "c.csv", ["2020-02-03", "2020-02-04"])
    with pytest.raises(EAGRLInputError, match=r"c.csv: missing feature column\(s\) \['gender', 'age'\]; pass --data.init_args.allow_missing_features"):
        _module(path, tmp_path / "cache", allow_missing_features=False).setup("test")
    dm = _module(_cohort_file(tmp_path / "d.csv", ["2020-02-03", "2020-02-04"], with_demographics=True), tmp_path / "cache", allow_missing_features=False)
    dm.setup("test")  # every column of the model's features is there: no option needed
    assert dm.input_report == {}


def test_dates_in_another_format(tmp_path):
    day_first = _cohort_file(tmp_path / "c.csv", ["03.02.2020 10:00", "04.02.2020 10:00", "13.02.2020 10:00"])
    cohort = tjh.load_tjh(tmp_path, raw_file=day_first, features=NAMES, allow_missing=True, date_format="%d.%m.%Y %H:%M")
    assert cohort.num_samples == 3 and cohort.notes["absent_features"] == ["Sex", "Age"]
    with pytest.raises(EAGRLInputError, match=r"column 'RE_DATE' value '13.02.2020 10:00' does not match data.date_format '%m.%d.%Y %H:%M'"):
        tjh.load_tjh(tmp_path, raw_file=day_first, features=NAMES, allow_missing=True, date_format="%m.%d.%Y %H:%M")
    garbled = _cohort_file(tmp_path / "g.csv", ["2020-02-03", "the third of May"])
    with pytest.raises(EAGRLInputError, match="'the third of May' is not a date pandas can read; give data.date_format"):
        tjh.load_tjh(tmp_path, raw_file=garbled, features=NAMES, allow_missing=True)


def test_options_that_do_not_apply_are_refused(tmp_path):
    path = _cohort_file(tmp_path / "c.csv", ["2020-02-03", "2020-02-04"])
    with pytest.raises(EAGRLInputError, match="for a MIMIC-IV folder use data.mimic_dir"):
        EHRDataModule(dataset="mimic_iv", cohort_file=str(path))
    with pytest.raises(EAGRLInputError, match="'published' names the shipped TJH file's patients"):
        EHRDataModule(dataset="tjh", cohort_file=str(path), split="published")
    with pytest.raises(EAGRLInputError, match="not `fit`"):
        _module(path, tmp_path / "cache").setup("fit")
    dm = _module(path, tmp_path / "cache")
    dm.setup("test")
    with pytest.raises(EAGRLInputError, match="the checkpoint was trained on 3 features, this cohort has 5"):
        dm.load_state_dict({"training_statistics": {**_stats(), "features": NAMES[2:]}})


def test_the_unit_check_names_a_feature_ten_times_off(tmp_path):
    cohort = tjh.load_tjh(tmp_path, raw_file=_cohort_file(tmp_path / "c.csv", ["2020-02-03", "2020-02-04"]), features=NAMES, allow_missing=True)
    cohort = cohort.select_features(NAMES)
    stats = NormStats(*(np.asarray(_stats()[k], dtype=np.float64) for k in ("mean", "std", "median")))
    assert unit_warnings(cohort, stats) == []  # LDH 200/300 vs 280, CRP 3/4 vs 30 (7.5x: within 10x), lymphocytes 30/29 vs 18
    stats.median[NAMES.index("Lactate dehydrogenase")] = 25_000.0
    (line,) = unit_warnings(cohort, stats)
    assert line.startswith("data: feature 'Lactate dehydrogenase' has median 250 in this cohort and 2.5e+04") and "U/L" in line
