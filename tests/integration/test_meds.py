"""MEDS input (issue 18) against the native MIMIC-IV reader on the shared demo: the shipped ``chartevents.csv.gz``
was rebuilt from the same MEDS parquet, so both readers must give the same stays, daily features and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eagrl.data import meds, mimic_iv
from eagrl.errors import EAGRLInputError
from eagrl.paths import data_dir
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

DEMO = "mimic-iv-demo"
EVENTS = f"{DEMO}/meds_fallback/mimic_iv_demo_meds_events.parquet"


@pytest.fixture(scope="module")
def demo() -> Path:
    root = data_dir(None)
    if not (root / EVENTS).is_file():
        pytest.skip(f"the shared data folder has no {EVENTS}")
    return root


@pytest.fixture(scope="module")
def both(demo) -> tuple:
    """(MEDS cohort, native cohort, native stay_id -> MEDS sample id)."""
    from_meds = meds.load_meds(demo / EVENTS, "value", chunk_size=250_000, progress=False)
    native = mimic_iv.load_mimic_iv(demo / DEMO, progress=False)
    stays = pd.read_csv(demo / DEMO / mimic_iv.ICUSTAYS, parse_dates=["intime"])
    key = {str(r.stay_id): f"{r.subject_id}@{r.intime:%Y-%m-%dT%H:%M:%S}" for r in stays.itertuples()}
    return from_meds, native, key


def test_meds_daily_features_and_labels_equal_the_native_reader(both):
    from_meds, native, key = both
    assert from_meds.num_samples == native.num_samples == 140
    where = {s: j for j, s in enumerate(from_meds.sample_ids)}
    assert from_meds.feature_names == native.feature_names
    for i, stay in enumerate(native.sample_ids):
        j = where[key[stay]]  # the same ICU stay, rebuilt from ICU_ADMISSION / ICU_DISCHARGE codes
        a, b = from_meds.values[from_meds.rows(j)], native.values[native.rows(i)]  # [T, F]
        assert list(from_meds.days[from_meds.rows(j)]) == list(native.days[native.rows(i)]), stay
        assert (np.isnan(a) == np.isnan(b)).all(), stay
        measured = ~np.isnan(b)
        np.testing.assert_allclose(a[measured], b[measured], rtol=1e-5, atol=0)
        for task in ("mortality", "readmission"):
            assert from_meds.labels[task][j] == native.labels[task][i], (task, stay)
        assert from_meds.exclusion[j] == native.exclusion[i]
        assert from_meds.patient_ids[j] == native.patient_ids[i]
    assert from_meds.notes["implausible_values"] == native.notes["implausible_values"]
    assert int(from_meds.labels["mortality"].sum()) > 0 and int(from_meds.labels["readmission"].sum()) > 0


def test_meds_age_is_the_admission_year_minus_the_birth_year(both, demo):
    from_meds = both[0]
    events = pd.read_parquet(demo / EVENTS, columns=["subject_id", "time", "code"])
    birth = events[events["code"] == meds.BIRTH].set_index("subject_id")["time"].dt.year
    admitted = events[events["code"].str.startswith(meds.HOSP_IN + "//")].sort_values("time")
    age = from_meds.feature_names.index("Age")
    checked = 0
    for j, sample in enumerate(from_meds.sample_ids):
        subject, intime = sample.split("@")
        before = admitted[(admitted["subject_id"] == int(subject)) & (admitted["time"] <= pd.Timestamp(intime))]
        if before.empty or from_meds.rows(j).stop == from_meds.rows(j).start:
            continue
        year = before["time"].iloc[-1].year  # the admission holding the stay
        assert from_meds.values[from_meds.rows(j).start, age] == year - birth[int(subject)]
        checked += 1
    assert checked >= 130


def test_meds_reads_in_chunks_with_the_same_result(both, demo):
    small = meds.load_meds(demo / EVENTS, "value", chunk_size=40_000, progress=False)  # 23 chunks
    big = both[0]
    assert list(small.sample_ids) == list(big.sample_ids)
    np.testing.assert_array_equal(small.values, big.values)
    assert all((small.labels[t] == big.labels[t]).all() for t in big.labels)


def test_meds_label_file_labels_the_stays_it_names(demo, tmp_path, both):
    from_meds = both[0]
    chosen = [0, 5, 9]
    rows = []
    for j in chosen:
        subject, intime = from_meds.sample_ids[j].split("@")
        rows.append({"subject_id": int(subject), "prediction_time": pd.Timestamp(intime) + pd.Timedelta(hours=1), "boolean_value": j != 5})
    rows.append({"subject_id": 1, "prediction_time": pd.Timestamp("2100-01-01"), "boolean_value": True})  # no such stay
    labels = tmp_path / "labels.parquet"
    pd.DataFrame(rows).to_parquet(labels)
    cohort = meds.load_meds(demo / EVENTS, "value", label_file=labels, task="mortality", progress=False)
    assert [int(cohort.labels["mortality"][j]) for j in chosen] == [1, 0, 1]
    assert set(np.flatnonzero(cohort.exclusion == meds.NO_LABEL)) == set(range(140)) - set(chosen) - set(np.flatnonzero(both[0].exclusion != ""))
    assert cohort.notes["label_rows_without_stay"] == 1


def test_a_bad_mapping_or_value_column_is_one_clear_error(demo, tmp_path):
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("code,feature,conversion\nLAB//220045//*,Heart rates,\n")
    with pytest.raises(EAGRLInputError, match=r"mapping.csv: column 'feature' names \['Heart rates'\], which are not MIMIC-IV variables"):
        meds.load_meds(demo / EVENTS, "value", mapping_file=mapping, progress=False)
    with pytest.raises(EAGRLInputError, match=r"missing required column\(s\) \['numeric_value'\].*data.meds_value_column"):
        meds.load_meds(demo / EVENTS, "numeric_value", progress=False)


def test_meds_through_the_cli_matches_the_native_cohort(demo, session_cache):
    printed = {}
    for config in ("configs/meds/concare_mortality.yaml", "configs/mimic_iv/concare_mortality.yaml"):
        result = run_cli("summary", "--config", config, cache=session_cache)
        assert result.returncode == 0, result.stderr[-3000:]
        printed[config] = json.loads(result.stdout)
    from_meds, native = printed.values()
    assert from_meds["dataset"] == "meds" and from_meds["feature_names"] == native["feature_names"]
    assert from_meds["splits"] == native["splits"]  # the same patients in each split, the same labels
    assert from_meds["unpaired_hospital_codes"] == 2 and from_meds["stays_without_admission"] == 1


def test_meds_observation_window_equals_the_native_reader(demo, both):
    key = both[2]
    from_meds = meds.load_meds(demo / EVENTS, "value", progress=False, observation_hours=48)
    native = mimic_iv.load_mimic_iv(demo / DEMO, progress=False, observation_hours=48)
    where = {s: j for j, s in enumerate(from_meds.sample_ids)}
    order = [where[key[s]] for s in native.sample_ids]
    assert list(from_meds.exclusion[order]) == list(native.exclusion)
    assert int((native.exclusion == "").sum()) == 74  # the README's 48-hour cohort
    for i, j in enumerate(order):
        a, b = from_meds.values[from_meds.rows(j)], native.values[native.rows(i)]
        assert a.shape == b.shape and (np.isnan(a) == np.isnan(b)).all()
        np.testing.assert_allclose(a[~np.isnan(b)], b[~np.isnan(b)], rtol=1e-5, atol=0)
