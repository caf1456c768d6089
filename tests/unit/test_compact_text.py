"""The compact patient text (``text_style: compact``) on hand-made patients: every measured variable shown
once, H/L flags right at the range edges, nothing unmeasured shown as a value, and the shuffle applied
before grouping."""

from __future__ import annotations

import re

import numpy as np
import pytest

from eagrl.data.features import MIMIC_FEATURES, TJH_FEATURES, FeatureSpec
from eagrl.data.text import normal_bounds, serialize_patient, trend
from eagrl.errors import EAGRLInputError

SPECS = (
    FeatureSpec("Sex", "", "1 male, 0 female", binary=True, demographic=True),
    FeatureSpec("Age", "years", "", demographic=True),
    FeatureSpec("Heart rate", "bpm", "60-100"),
    FeatureSpec("Troponin", "ng/L", "< 14"),
    FeatureSpec("eGFR", "mL/min", "> 90"),
    FeatureSpec("Hemoglobin", "g/L", "men 140-180, women 120-160"),
    FeatureSpec("pH (source not recorded)", "", ""),
    FeatureSpec("GCS total", "points", "15"),
    FeatureSpec("Lactate", "mmol/L", "0.5-2"),
    FeatureSpec("Albumin", "g/L", "35-55"),
)
NAN = np.nan


def _patient(columns: dict[str, list[float]], sex: float = 1.0, visits: int = 3) -> np.ndarray:
    values = np.full((visits, len(SPECS)), np.nan)
    values[:, 0], values[:, 1] = sex, 70
    names = [s.name for s in SPECS]
    for name, series in columns.items():
        values[:, names.index(name)] = series
    return values


def _lines(text: str) -> dict[str, str]:
    return {line[2:].split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}


def _group(text: str, head: str) -> list[str]:
    line = next((l for l in text.splitlines() if l.startswith(head)), "")
    return [n.strip() for n in line[len(head) :].rstrip(".").split(";")] if line else []


def test_every_measured_variable_is_shown_once_and_nothing_unmeasured_as_a_value():
    values = _patient(
        {
            "Heart rate": [110, 120, 130],
            "Troponin": [5, NAN, 8],
            "eGFR": [NAN, NAN, 95],
            "pH (source not recorded)": [5.5, 6.0, 6.0],
            "GCS total": [15, 15, 15],
            "Albumin": [NAN, NAN, NAN],
        }
    )
    text = serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact")
    measured = {"Heart rate", "Troponin", "eGFR", "pH (source not recorded)", "GCS total"}
    for name in measured | {"Hemoglobin", "Lactate", "Albumin"}:
        assert text.count(name) == 1, name  # once: its own line, the normal group or the unmeasured list
    assert set(_lines(text)) == {"Heart rate", "pH (source not recorded)"}
    assert set(_group(text, "Within the normal range at every measurement:")) == {"Troponin", "eGFR", "GCS total"}
    assert set(_group(text, "Not measured:")) == {"Hemoglobin", "Lactate", "Albumin"}  # listed by name, no value
    assert "NA" not in text.split()  # nothing imputed, no missing-value placeholders
    assert _lines(text)["Heart rate"] == "- Heart rate: 130 bpm H; 110-130, rising"
    assert _lines(text)["pH (source not recorded)"] == "- pH (source not recorded): 6; 5.5-6, rising"  # no range: no flag
    assert "The patient had 3 visits, on days 1, 2 and 3" in text


@pytest.mark.parametrize(
    "name, value, sex, flag",
    [
        ("Heart rate", 100.0, 1, ""),  # inclusive edges
        ("Heart rate", 100.01, 1, "H"),
        ("Heart rate", 100.004, 1, ""),  # shown as 100: flagged as shown
        ("Heart rate", 60.0, 1, ""),
        ("Heart rate", 59.99, 1, "L"),
        ("Troponin", 13.99, 1, ""),  # "< 14": 14 itself is abnormal
        ("Troponin", 14.0, 1, "H"),
        ("eGFR", 90.0, 1, "L"),  # "> 90": 90 itself is abnormal
        ("eGFR", 90.01, 1, ""),
        ("Hemoglobin", 139.0, 1, "L"),  # men 140-180
        ("Hemoglobin", 139.0, 0, ""),  # women 120-160
        ("Hemoglobin", 165.0, 0, "H"),
        ("Hemoglobin", 125.0, NAN, ""),  # unknown sex: normal for either
        ("GCS total", 14.0, 1, "L"),  # a single normal value
    ],
)
def test_flags_at_the_range_edges(name, value, sex, flag):
    values = _patient({name: [NAN, NAN, value]}, sex=sex)
    text = serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact")
    if flag:
        assert _lines(text)[name].startswith(f"- {name}: ") and f" {flag}; measured once" in _lines(text)[name]
    else:
        assert name not in _lines(text) and name in _group(text, "Within the normal range at every measurement:")


def test_a_variable_abnormal_earlier_keeps_its_own_line_without_a_flag_on_a_normal_last_value():
    values = _patient({"Lactate": [4.0, 2.5, 1.5]})
    line = _lines(serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact"))["Lactate"]
    assert line == "- Lactate: 1.5 mmol/L; 1.5-4, falling"


def test_trend_is_relative_to_the_first_value():
    assert trend(100, 105) == "stable" and trend(100, 105.1) == "rising" and trend(100, 94) == "falling"
    assert trend(0, 0.5) == "rising" and trend(0, 0) == "stable"


def test_every_catalogue_range_parses():
    for spec in TJH_FEATURES + MIMIC_FEATURES:
        if not spec.demographic:
            normal_bounds(spec.normal_range, 1.0)  # raises on a form the flagger does not know
    tjh_ph = next(s for s in TJH_FEATURES if s.name.startswith("pH"))
    assert normal_bounds(tjh_ph.normal_range) is None  # mixed urine/blood pH: never flagged
    with pytest.raises(EAGRLInputError, match="normal range"):
        normal_bounds("normal-ish")


def test_the_shuffle_permutes_variables_before_grouping():
    columns = {name: [v, v, v] for name, v in (("Heart rate", 120), ("Troponin", 20), ("eGFR", 50), ("Lactate", 1.0), ("Albumin", 40), ("GCS total", 15))}
    columns["Hemoglobin"] = [150, 150, 150]
    values = _patient(columns)
    plain = serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact", sample_id="a")
    shuffled = serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact", sample_id="a", shuffle_fraction=1.0, shuffle_seed=3)
    own = [[line for line in text.splitlines() if line.startswith("- ")] for text in (plain, shuffled)]
    assert sorted(own[0]) == sorted(own[1]) and own[0] != own[1]  # the same variable lines, in another order
    normal = "Within the normal range at every measurement:"
    assert sorted(_group(plain, normal)) == sorted(_group(shuffled, normal)) and _group(plain, normal) != _group(shuffled, normal)


def test_the_style_option_changes_the_text_and_an_unknown_one_is_refused():
    values = _patient({"Heart rate": [80, 90, 120]})
    paper = serialize_patient(values, np.array([1, 2, 3]), SPECS)
    compact = serialize_patient(values, np.array([1, 2, 3]), SPECS, style="compact")
    assert paper != compact and '"80, 90, 120"' in paper and "120 bpm H; 80-120, rising" in compact
    with pytest.raises(EAGRLInputError, match="text style"):
        serialize_patient(values, np.array([1, 2, 3]), SPECS, style="terse")


def test_compact_tjh_text_is_shorter_and_names_only_catalogue_features(tjh_module):
    data = tjh_module.datasets["test"]
    names = {s.name for s in TJH_FEATURES}
    for i in range(5):
        compact, paper = data.text(i, style="compact"), data.text(i, style="paper")
        assert len(compact) < 0.7 * len(paper)
        shown = set(_lines(compact)) | set(_group(compact, "Within the normal range at every measurement:")) | set(_group(compact, "Not measured:"))
        assert shown == names - {"Sex", "Age"}  # every feature, by its dataset name
        measured = np.flatnonzero(~np.isnan(data[i]["raw"]).all(axis=0))
        assert {TJH_FEATURES[j].name for j in measured} - {"Sex", "Age"} == shown - set(_group(compact, "Not measured:"))
        assert re.search(r"The patient had \d+ visits?", compact)
