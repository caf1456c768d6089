"""The EHR data layer on the real shipped data: cohorts, splits, normalisation, imputation, text."""

from __future__ import annotations

import numpy as np
import pytest

from eagrl.data.cohort import SPLITS
from eagrl.data.preprocess import impute_forward_then_fill, stratified_patient_split, train_statistics
from eagrl.data.text import serialize_patient, shuffled_order
from eagrl.data.features import FeatureSpec


def _tjh_expected_counts(data_root) -> dict[str, dict[str, int]]:
    """The TJH split sizes derived from the raw sheet by the README's rules, independently of the reader:
    patients with a dated record, rows after the discharge date dropped, patients left with none excluded."""
    import pandas as pd

    sheet = pd.read_excel(data_root / "tjh/raw/time_series_375_prerpocess_en.xlsx")
    sheet["PATIENT_ID"] = sheet["PATIENT_ID"].ffill()
    sheet["RE_DATE"] = pd.to_datetime(sheet["RE_DATE"], errors="coerce")
    sheet = sheet[sheet["RE_DATE"].notna()]
    discharge = pd.to_datetime(sheet.groupby("PATIENT_ID")["Discharge time"].transform("first"))
    kept = sheet[sheet["RE_DATE"].dt.normalize() <= discharge.dt.normalize()]
    outcome = kept.groupby("PATIENT_ID")["outcome"].first()
    split = pd.read_csv(data_root / "tjh/splits/tjh_clinicrealm_split_ids.csv").set_index("PATIENT_ID")["split"]
    before = split.value_counts().to_dict()
    after = split.loc[outcome.index]
    return {
        s: {"patients": int((after == s).sum()), "samples": int((after == s).sum()), "positives": int(outcome[after == s].sum()),
            "before_exclusions": int(before[s])}
        for s in SPLITS
    }  # fmt: skip


def test_tjh_published_split_counts(tjh_module, data_root):
    summary = tjh_module.summary()
    assert summary["features"] == 75 and len(summary["feature_names"]) == 75
    assert summary["feature_names"][:2] == ["Sex", "Age"]
    assert "2019-nCoV nucleic acid detection" not in summary["feature_names"]
    expected = _tjh_expected_counts(data_root)
    assert {s: {k: v for k, v in summary["splits"][s].items() if k != "excluded"} for s in SPLITS} == expected
    assert {s: expected[s]["before_exclusions"] for s in SPLITS} == {"train": 140, "val": 21, "test": 200}  # the published split
    excluded = {s: sum(summary["splits"][s]["excluded"].values()) for s in SPLITS}
    assert all(expected[s]["before_exclusions"] - expected[s]["samples"] == excluded[s] for s in SPLITS)
    assert summary["rows_after_discharge"] > 0 and summary["observation_window"] == "the whole stay"
    raw = tjh_module.cohort.raw
    assert raw.num_samples == sum(e["samples"] for e in expected.values())
    assert np.diff(raw.offsets).max() == 13


def _mimic_expected_labels(data_root) -> tuple[int, int]:
    """(deaths, readmissions) of the demo's ICU stays by the README's definitions, from the raw tables."""
    import pandas as pd

    folder = data_root / "mimic-iv-demo"
    stays = pd.read_csv(folder / "icu/icustays.csv.gz", parse_dates=["intime", "outtime"])
    admissions = pd.read_csv(folder / "hosp/admissions.csv.gz", parse_dates=["admittime", "dischtime", "deathtime"])
    patients = pd.read_csv(folder / "hosp/patients.csv.gz", parse_dates=["dod"])
    table = stays.merge(admissions, on=["subject_id", "hadm_id"]).merge(patients, on="subject_id")
    died = table["deathtime"].fillna(table["dod"])
    in_hospital = died.notna() & (died.dt.normalize() >= table["admittime"].dt.normalize()) & (died.dt.normalize() <= table["dischtime"].dt.normalize())
    deaths = 0
    readmissions = 0
    for _, stay in table.iterrows():
        deaths += bool(in_hospital[_])
        later = table[(table["subject_id"] == stay["subject_id"]) & (table["intime"] > stay["intime"])]
        back = ((later["intime"] - stay["outtime"]) <= pd.Timedelta(days=30)).any()
        when = stay["deathtime"] if pd.notna(stay["deathtime"]) else stay["dod"]
        dead = pd.notna(when) and stay["intime"].normalize() <= when <= stay["outtime"] + pd.Timedelta(days=30)
        readmissions += bool(back or dead)
    return deaths, readmissions


def test_mimic_demo_cohort_and_prevalence(mimic_module, session_cache, data_root):
    from datamodules import EHRDataModule

    deaths, readmissions = _mimic_expected_labels(data_root)
    assert (deaths, readmissions) == (20, 39)  # METHOD.md §1: 14.3 % and 27.9 % of 140 stays
    raw = mimic_module.cohort.raw
    assert raw.num_samples == 140 and len(np.unique(raw.patient_ids)) == 100
    assert raw.values.shape[1] == 19  # Sex, Age + the 17 clinical variables
    assert int(raw.labels["mortality"].sum()) == deaths
    assert int(raw.labels["readmission"].sum()) == readmissions
    assert np.diff(raw.offsets).max() <= 8 and np.diff(raw.offsets).min() >= 1
    summary = mimic_module.summary()
    assert sum(s["samples"] for s in summary["splits"].values()) == 140
    assert sum(s["positives"] for s in summary["splits"].values()) == deaths
    readmission = EHRDataModule(dataset="mimic_iv", task="readmission", cache_dir=str(session_cache), progress=False)
    assert sum(s["positives"] for s in readmission.summary()["splits"].values()) == readmissions


def test_mimic_values_are_converted_to_documented_units(mimic_module):
    raw = mimic_module.cohort.raw
    names = raw.feature_names
    temperature = raw.values[:, names.index("Temperature")]
    assert 34 < np.nanmedian(temperature) < 39  # Celsius, not Fahrenheit
    fio2 = raw.values[:, names.index("Fraction inspired oxygen")]
    assert np.nanmax(fio2) <= 1.0  # a fraction
    gcs = raw.values[:, [names.index(n) for n in ("Glasgow coma scale eye opening", "Glasgow coma scale motor response", "Glasgow coma scale verbal response")]]
    total = raw.values[:, names.index("Glasgow coma scale total")]
    complete = ~np.isnan(gcs).any(axis=1)
    np.testing.assert_allclose(total[complete], gcs[complete].sum(axis=1))


@pytest.mark.parametrize("module", ["tjh_module", "mimic_module"])
def test_no_patient_in_two_splits(module, request):
    cohort = request.getfixturevalue(module).cohort
    owners = {}
    for patient, split in zip(cohort.raw.patient_ids, cohort.split):
        assert owners.setdefault(patient, split) == split


def test_stratified_split_is_seeded_and_stratified():
    patients = np.repeat(np.arange(100).astype(str), 2)
    labels = np.repeat((np.arange(100) % 4 == 0).astype(np.int8), 2)
    a = stratified_patient_split(patients, labels, (0.7, 0.1, 0.2), seed=1)
    b = stratified_patient_split(patients, labels, (0.7, 0.1, 0.2), seed=1)
    c = stratified_patient_split(patients, labels, (0.7, 0.1, 0.2), seed=2)
    assert (a == b).all() and (a != c).any()
    for split, share in zip(SPLITS, (0.7, 0.1, 0.2)):
        assert labels[a == split].mean() == pytest.approx(0.25, abs=0.06)
        assert (a == split).mean() == pytest.approx(share, abs=0.03)


def test_normalisation_uses_train_only(tjh_module):
    cohort = tjh_module.cohort
    raw = cohort.raw
    reference = train_statistics(raw, cohort.split)
    np.testing.assert_allclose(reference.mean, cohort.stats.mean)
    # change every val/test value wildly: the statistics must not move
    sample_of_row = np.repeat(np.arange(raw.num_samples), np.diff(raw.offsets))
    held_out = cohort.split[sample_of_row] != "train"
    poisoned = raw.values.copy()
    poisoned[held_out] = poisoned[held_out] * 1000 + 1e6
    from dataclasses import replace

    stats = train_statistics(replace(raw, values=poisoned), cohort.split)
    np.testing.assert_allclose(stats.mean, reference.mean)
    np.testing.assert_allclose(stats.std, reference.std)
    np.testing.assert_allclose(stats.median, reference.median)
    # and the statistics follow the 5-95th percentile rule on train rows
    j = raw.feature_names.index("Age")
    train_age = raw.values[~held_out, j].astype(np.float64)
    low, high = np.percentile(train_age, [5, 95])
    inner = train_age[(train_age > low) & (train_age < high)]
    assert reference.mean[j] == pytest.approx(inner.mean())
    assert reference.std[j] == pytest.approx(inner.std(ddof=1))
    assert reference.mean[0] == 0 and reference.std[0] == 1  # Sex is binary: not z-scored


def test_carry_forward_then_median_imputation():
    nan = np.nan
    values = np.array(
        [
            [nan, 1.0],  # sample 0, day 1
            [2.0, nan],  # sample 0, day 2
            [nan, nan],  # sample 0, day 3
            [nan, 5.0],  # sample 1, day 1: nothing to carry from sample 0
            [7.0, nan],  # sample 1, day 2
        ],
        dtype=np.float32,
    )
    offsets = np.array([0, 3, 5])
    filled = impute_forward_then_fill(values, offsets, fill=np.array([-1.0, -2.0]))
    expected = np.array([[-1, 1], [2, 1], [2, 1], [-1, 5], [7, 5]], dtype=np.float32)
    np.testing.assert_array_equal(filled, expected)
    assert np.isnan(values).sum() == 6  # input untouched


def test_imputed_values_are_marked_missing(tjh_module):
    item = tjh_module.datasets["train"][0]
    assert not np.isnan(item["x"]).any()
    np.testing.assert_array_equal(item["missing"], np.isnan(item["raw"]))


SPECS = (
    FeatureSpec("Sex", "", "", binary=True, demographic=True),
    FeatureSpec("Age", "years", "", demographic=True),
    FeatureSpec("Heart rate", "bpm", "60-100"),
    FeatureSpec("Lactate", "mmol/L", "0.5-2.2"),
    FeatureSpec("pH", "", "7.35-7.45"),
)
GOLDEN = """The patient is a female, aged 63 years. The patient had 3 visits, on days 1, 2 and 4 of the stay.
Feature values per visit (unit; normal range):
- Heart rate (bpm; 60-100): "92, NA, 101.5"
- Lactate (mmol/L; 0.5-2.2): "NA, 0.0123, 3"
- pH (no unit; 7.35-7.45): "7.31, 7.35, NA\""""


def test_golden_text_serialisation():
    nan = np.nan
    values = np.array([[0, 63, 92, nan, 7.31], [0, 63, nan, 0.01234, 7.35], [0, 63, 101.5, 3.0, nan]], dtype=np.float64)
    assert serialize_patient(values, np.array([1, 2, 4]), SPECS) == GOLDEN
    shown = serialize_patient(values, np.array([1, 2, 4]), SPECS, max_visits=1)
    assert "had 1 visit, on day 4" in shown and '"101.5"' in shown


def _feature_lines(text: str) -> dict[str, list[str]]:
    """``{feature name: [the printed value of each visit]}`` of a serialised patient."""
    found = {}
    for line in text.splitlines()[2:]:
        name, series = line[2:].rsplit(" (", 1)[0], line.rsplit(': "', 1)[1].rstrip('"')
        found[name] = series.split(", ")
    return found


def test_text_prints_every_measured_value_as_the_formatter_renders_it(tjh_module):
    from eagrl.data.text import format_value

    dataset = tjh_module.datasets["test"]
    features = tjh_module.cohort.raw.features
    for i in range(0, len(dataset), 37):
        item = dataset[i]
        printed = _feature_lines(dataset.text(i))
        for j, spec in enumerate(features):
            if spec.demographic:
                continue
            expected = [format_value(float(v)) for v in item["raw"][:, j]]
            assert printed[spec.name] == expected, spec.name
            assert printed[spec.name].count("NA") == int(item["missing"][:, j].sum())  # imputed values never shown


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6, 1.0])
def test_shuffle_is_reproducible_and_keeps_every_line(tjh_module, fraction):
    dataset = tjh_module.datasets["test"]
    plain = dataset.text(3).splitlines()
    once = dataset.text(3, shuffle_fraction=fraction, shuffle_seed=7).splitlines()
    again = dataset.text(3, shuffle_fraction=fraction, shuffle_seed=7).splitlines()
    other = dataset.text(3, shuffle_fraction=fraction, shuffle_seed=8).splitlines()
    assert once == again and once != other
    assert sorted(once) == sorted(plain) and once[:2] == plain[:2]
    moved = sum(a != b for a, b in zip(once[2:], plain[2:]))
    assert moved == int(round(fraction * 73))
    # the text's order is exactly shuffled_order's permutation of the feature lines
    order = shuffled_order(73, fraction, 7, dataset.ids[3])
    assert once[2:] == [plain[2 + k] for k in order]


def test_shuffled_order_is_a_permutation():
    order = shuffled_order(17, 0.4, seed=3, sample_id="x")
    assert sorted(order) == list(range(17)) and (order != np.arange(17)).sum() == round(0.4 * 17)
    assert (shuffled_order(17, 0.0, 3, "x") == np.arange(17)).all()


def test_batches_are_padded_with_masks(mimic_module):
    batch = next(iter(mimic_module.train_dataloader()))
    b, t, f = batch["x"].shape
    assert f == 19 and batch["mask"].shape == (b, t) and batch["demographics"].shape == (b, 2)
    assert (batch["mask"].sum(1) == batch["lengths"]).all()
    padded = ~batch["mask"]
    assert (batch["x"][padded] == 0).all() and batch["missing"][padded].all()


def test_train_patients_is_a_fixed_balanced_subset(session_cache):
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="tjh", cache_dir=str(session_cache), progress=False, train_patients=6, batch_size=4)
    dm.setup()
    epochs = [sorted(i for batch in dm.train_dataloader() for i in batch["index"].tolist()) for _ in range(2)]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 6  # the same patients every epoch
    labels = dm.datasets["train"].labels[epochs[0]]
    assert int(labels.sum()) == 3  # half of each outcome
    again = EHRDataModule(dataset="tjh", cache_dir=str(session_cache), progress=False, train_patients=6)
    again.setup()
    assert again.train_subset() == epochs[0]  # seeded


def test_eval_patients_is_a_balanced_test_subset(session_cache):
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="tjh", cache_dir=str(session_cache), progress=False, eval_patients=8, batch_size=3)
    dm.setup()
    seen = [i for batch in dm.test_dataloader() for i in batch["index"].tolist()]
    assert seen == sorted(seen) and len(seen) == 8 and all(s == "test" for b in dm.test_dataloader() for s in b["split"])
    assert int(dm.datasets["test"].labels[seen].sum()) == 4


def test_shuffle_fraction_permutes_the_text_only(session_cache, tjh_module):
    """ConCare has one GRU per feature and is order-invariant by construction: its tensors keep the feature
    order (permuting them would feed one feature's values to another's GRU); only the text is shuffled."""
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="tjh", cache_dir=str(session_cache), progress=False, shuffle_fraction=1.0)
    dm.setup()
    plain, shuffled = tjh_module.datasets["test"][0], dm.datasets["test"][0]
    for key in ("x", "missing", "raw"):
        assert np.array_equal(plain[key], shuffled[key], equal_nan=True), key
    assert dm.datasets["test"].text(0) != tjh_module.datasets["test"].text(0)
