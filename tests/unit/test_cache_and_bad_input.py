"""Preprocessing cache (reuse, invalidation, damage) and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from datamodules import EHRDataModule
from eagrl.data import preprocess
from eagrl.errors import EAGRLInputError

TJH_XLSX = "tjh/raw/time_series_375_prerpocess_en.xlsx"
TJH_SPLIT = "tjh/splits/tjh_clinicrealm_split_ids.csv"


def _module(root: Path, cache: Path, **kwargs) -> EHRDataModule:
    return EHRDataModule(dataset="tjh", data_dir=str(root), cache_dir=str(cache), progress=False, **kwargs)


def _cache_files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _rewrite_xlsx(root: Path, edit) -> None:
    path = root / TJH_XLSX
    frame = pd.read_excel(path)
    frame = edit(frame)
    frame.to_excel(path, index=False)


def test_cache_is_reused(tjh_copy, tmp_path):
    cache = tmp_path / "cache"
    first, built = _module(tjh_copy, cache).load_cohort(), None
    calls = []
    original = preprocess.load_or_build

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result[1])
        return result

    import datamodules.ehr as ehr

    ehr.load_or_build, saved = spy, ehr.load_or_build
    try:
        second = _module(tjh_copy, cache).load_cohort()
    finally:
        ehr.load_or_build = saved
    assert calls == [False]  # loaded, not rebuilt
    assert (first.normalised == second.normalised).all() and list(first.split) == list(second.split)
    assert built is None


def _built(root, cache, **kwargs) -> bool:
    dm = _module(root, cache, **kwargs)
    source = dm._source_dir()
    options = dm._options(source)
    return preprocess.load_or_build(
        "tjh", options, [source / TJH_XLSX], lambda: dm._build(source, preprocess.cache_folder(cache, "tjh", options)), cache
    )[1]


@pytest.mark.slow
def test_cache_invalidation_on_source_version_and_option(tjh_copy, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert _built(tjh_copy, cache) is True
    assert _built(tjh_copy, cache) is False
    # an option change: another cache entry
    assert _built(tjh_copy, cache, split="stratified", split_seed=3) is True
    assert _built(tjh_copy, cache) is False
    # a changed source file
    _rewrite_xlsx(tjh_copy, lambda f: f.assign(age=f["age"] + 1))
    assert _built(tjh_copy, cache) is True
    assert _built(tjh_copy, cache) is False
    # a new preprocessing version
    monkeypatch.setattr(preprocess, "PREPROCESS_VERSION", preprocess.PREPROCESS_VERSION + 1)
    assert _built(tjh_copy, cache) is True


def test_damaged_cache_is_rebuilt_not_trusted(tjh_copy, tmp_path):
    cache = tmp_path / "cache"
    good = _module(tjh_copy, cache).load_cohort()
    arrays = next(cache.rglob("arrays.npz"))
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])  # a torn write
    assert _built(tjh_copy, cache) is True
    again = _module(tjh_copy, cache).load_cohort()
    assert (again.normalised == good.normalised).all()


@pytest.mark.slow
def test_failed_rebuild_leaves_earlier_cache_intact(tjh_copy, tmp_path):
    cache = tmp_path / "cache"
    _module(tjh_copy, cache).load_cohort()
    before = _cache_files(cache)
    _rewrite_xlsx(tjh_copy, lambda f: f.drop(columns=["albumin"]))
    with pytest.raises(EAGRLInputError, match="albumin"):
        _module(tjh_copy, cache).load_cohort()
    assert _cache_files(cache) == before


# ------------------------------------------------------------------------------------- bad input
def test_missing_data_folder(tmp_path):
    with pytest.raises(EAGRLInputError, match="does-not-exist"):
        _module(tmp_path / "does-not-exist", tmp_path / "cache").load_cohort()


def test_missing_file(tjh_copy, tmp_path):
    (tjh_copy / TJH_XLSX).unlink()
    with pytest.raises(EAGRLInputError, match="time_series_375_prerpocess_en.xlsx"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


def test_not_a_spreadsheet(tjh_copy, tmp_path):
    (tjh_copy / TJH_XLSX).write_text("PATIENT_ID,RE_DATE\n1,2020-01-01\n")
    with pytest.raises(EAGRLInputError, match="cannot be read as an xlsx"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


@pytest.mark.slow
def test_missing_column(tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.drop(columns=["outcome"]))
    with pytest.raises(EAGRLInputError, match=r"missing required column.*outcome"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


@pytest.mark.slow
def test_non_numeric_value(tjh_copy, tmp_path):
    def edit(frame):
        frame["albumin"] = frame["albumin"].astype(object)
        frame.loc[5, "albumin"] = "high"
        return frame

    _rewrite_xlsx(tjh_copy, edit)
    with pytest.raises(EAGRLInputError, match=r"'albumin' must be numeric, found 'high'"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


@pytest.mark.slow
def test_label_not_binary(tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.assign(outcome=f["outcome"] * 3))
    with pytest.raises(EAGRLInputError, match="'outcome' must hold 0/1"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


@pytest.mark.slow
def test_empty_cohort(tjh_copy, tmp_path):
    _rewrite_xlsx(tjh_copy, lambda f: f.assign(RE_DATE=pd.NaT))
    with pytest.raises(EAGRLInputError, match="cohort is empty"):
        _module(tjh_copy, tmp_path / "cache").load_cohort()


def test_unknown_dataset_and_task(tmp_path):
    with pytest.raises(EAGRLInputError, match="unknown dataset 'eicu'"):
        EHRDataModule(dataset="eicu")
    with pytest.raises(EAGRLInputError, match="unknown task 'readmission' for dataset 'tjh'"):
        EHRDataModule(dataset="tjh", task="readmission")
    with pytest.raises(EAGRLInputError, match="published"):
        EHRDataModule(dataset="mimic_iv", split="published")


@pytest.fixture()
def mimic_copy(tmp_path, data_root) -> Path:
    root = tmp_path / "data" / "mimic"
    for rel in ("hosp/patients.csv.gz", "hosp/admissions.csv.gz", "icu/icustays.csv.gz", "icu/chartevents.csv.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / "mimic-iv-demo" / rel, root / rel)
    return root


def _mimic(root: Path, tmp_path: Path, **kwargs) -> EHRDataModule:
    return EHRDataModule(
        dataset="mimic_iv", mimic_dir=str(root), cache_dir=str(tmp_path / "cache"), progress=False, **kwargs
    )


def test_mimic_missing_column(mimic_copy, tmp_path):
    path = mimic_copy / "icu/icustays.csv.gz"
    pd.read_csv(path).drop(columns=["outtime"]).to_csv(path, index=False)
    with pytest.raises(EAGRLInputError, match=r"icustays.csv.gz: missing required column.*outtime"):
        _mimic(mimic_copy, tmp_path).load_cohort()


def test_mimic_table_that_is_not_csv(mimic_copy, tmp_path):
    (mimic_copy / "icu/chartevents.csv.gz").write_bytes(b"\x00\x01 not gzip at all")
    with pytest.raises(EAGRLInputError, match="chartevents.csv.gz: cannot be read as a CSV"):
        _mimic(mimic_copy, tmp_path).load_cohort()


def test_mimic_bad_dates(mimic_copy, tmp_path):
    path = mimic_copy / "hosp/admissions.csv.gz"
    frame = pd.read_csv(path)
    frame.loc[0, "admittime"] = "yesterday"
    frame.to_csv(path, index=False)
    with pytest.raises(EAGRLInputError, match="'admittime' must hold dates, found 'yesterday'"):
        _mimic(mimic_copy, tmp_path).load_cohort()


def test_mimic_missing_folder(tmp_path, data_root):
    with pytest.raises(EAGRLInputError, match="MIMIC-IV folder"):
        EHRDataModule(dataset="mimic_iv", mimic_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)).load_cohort()


def test_mimic_chunked_reading_gives_the_same_cohort(mimic_copy, tmp_path, mimic_module):
    small = _mimic(mimic_copy, tmp_path, chunk_size=5_000).load_cohort()
    reference = mimic_module.cohort
    assert list(small.raw.sample_ids) == list(reference.raw.sample_ids)
    import numpy as np

    np.testing.assert_array_equal(small.raw.offsets, reference.raw.offsets)
    np.testing.assert_allclose(small.raw.values, reference.raw.values, equal_nan=True)


def test_manifest_records_sources_and_version(tjh_copy, tmp_path):
    cache = tmp_path / "cache"
    _module(tjh_copy, cache).load_cohort()
    manifest = json.loads(next(cache.rglob("manifest.json")).read_text())
    assert manifest["version"] == preprocess.PREPROCESS_VERSION
    assert manifest["sources"]["time_series_375_prerpocess_en.xlsx"].startswith("sha256=")
    assert manifest["options"]["split"] == "published"
    assert not list(cache.rglob("*.tmp"))
