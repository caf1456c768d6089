"""Feature catalogues for TJH, MIMIC-IV and the synthetic cohort: names, units and adult normal ranges shown to the LLM.

Names are what the LLM reads and what the expert attention export lists, so they are also the
vocabulary of the attention-alignment reward. Demographics (Sex, Age) come first in every cohort.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    """One model input column."""

    name: str
    """Display name: shown to the LLM and used in the expert attention export."""
    unit: str = ""
    """Unit of the raw value ("" when unitless)."""
    normal_range: str = ""
    """Adult reference range as text ("" when none applies)."""
    binary: bool = False
    """True for 0/1 features, which are not z-scored."""
    demographic: bool = False
    """True for Sex and Age: constant per sample, fed to ConCare as the demographic token."""


DEMOGRAPHICS = (
    FeatureSpec("Sex", "", "1 male, 0 female", binary=True, demographic=True),
    FeatureSpec("Age", "years", "", demographic=True),
)

# TJH: (xlsx column, unit, normal range). 73 labs, after dropping '2019-nCoV nucleic acid detection'.
# The display name is the column name with surrounding spaces removed.
TJH_LABS: tuple[tuple[str, str, str], ...] = (
    ("Hypersensitive cardiac troponinI", "ng/L", "< 14"),
    ("hemoglobin", "g/L", "men 140-180, women 120-160"),
    ("Serum chloride", "mmol/L", "96-106"),
    ("Prothrombin time", "s", "11-14"),
    ("procalcitonin", "ng/mL", "< 0.05"),
    ("eosinophils(%)", "%", "1-6"),
    ("Interleukin 2 receptor", "U/mL", "223-710"),
    ("Alkaline phosphatase", "U/L", "44-147"),
    ("albumin", "g/L", "35-55"),
    ("basophil(%)", "%", "0-1"),
    ("Interleukin 10", "pg/mL", "< 9.1"),
    ("Total bilirubin", "µmol/L", "5.1-17"),
    ("Platelet count", "x10^9/L", "150-450"),
    ("monocytes(%)", "%", "2-10"),
    ("antithrombin", "%", "80-120"),
    ("Interleukin 8", "pg/mL", "< 62"),
    ("indirect bilirubin", "µmol/L", "3.4-12"),
    ("Red blood cell distribution width", "%", "11.5-14.5"),
    ("neutrophils(%)", "%", "40-75"),
    ("total protein", "g/L", "60-83"),
    ("Quantification of Treponema pallidum antibodies", "S/CO", "< 1"),
    ("Prothrombin activity", "%", "70-130"),
    ("HBsAg", "IU/mL", "< 0.05"),
    ("mean corpuscular volume", "fL", "80-100"),
    ("hematocrit", "%", "men 40-54, women 36-48"),
    ("White blood cell count", "x10^9/L", "3.5-9.5"),
    ("Tumor necrosis factorα", "pg/mL", "< 8.1"),
    ("mean corpuscular hemoglobin concentration", "g/L", "320-360"),
    ("fibrinogen", "g/L", "2-4"),
    ("Interleukin 1β", "pg/mL", "< 5"),
    ("Urea", "mmol/L", "2.8-7.6"),
    ("lymphocyte count", "x10^9/L", "1.1-3.2"),
    ("PH value", "", ""),  # mixed urine dipstick and blood values: no range applies (TJH_DISPLAY_NAMES)
    ("Red blood cell count", "x10^12/L", "men 4.3-5.8, women 3.8-5.1"),
    ("Eosinophil count", "x10^9/L", "0.02-0.52"),
    ("Corrected calcium", "mmol/L", "2.15-2.55"),
    ("Serum potassium", "mmol/L", "3.5-5.1"),
    ("glucose", "mmol/L", "3.9-6.1"),
    ("neutrophils count", "x10^9/L", "1.8-6.3"),
    ("Direct bilirubin", "µmol/L", "< 8"),
    ("Mean platelet volume", "fL", "7.4-11"),
    ("ferritin", "µg/L", "men 30-400, women 15-150"),
    ("RBC distribution width SD", "fL", "39-46"),
    ("Thrombin time", "s", "14-21"),
    ("(%)lymphocyte", "%", "20-50"),
    ("HCV antibody quantification", "S/CO", "< 1"),
    ("D-D dimer", "µg/mL FEU", "< 0.5"),
    ("Total cholesterol", "mmol/L", "< 5.2"),
    ("aspartate aminotransferase", "U/L", "8-40"),
    ("Uric acid", "µmol/L", "men 208-428, women 155-357"),
    ("HCO3-", "mmol/L", "22-29"),
    ("calcium", "mmol/L", "2.1-2.55"),
    ("Amino-terminal brain natriuretic peptide precursor(NT-proBNP)", "pg/mL", "< 125"),
    ("Lactate dehydrogenase", "U/L", "135-225"),
    ("platelet large cell ratio", "%", "13-43"),
    ("Interleukin 6", "pg/mL", "< 7"),
    ("Fibrin degradation products", "µg/mL", "< 5"),
    ("monocytes count", "x10^9/L", "0.1-0.6"),
    ("PLT distribution width", "fL", "9-17"),
    ("globulin", "g/L", "20-35"),
    ("γ-glutamyl transpeptidase", "U/L", "men 10-71, women 7-42"),
    ("International standard ratio", "", "0.8-1.2"),
    ("basophil count(#)", "x10^9/L", "0-0.06"),
    ("mean corpuscular hemoglobin", "pg", "27-34"),
    ("Activation of partial thromboplastin time", "s", "25-37"),
    ("High sensitivity C-reactive protein", "mg/L", "< 1"),
    ("HIV antibody quantification", "S/CO", "< 1"),
    ("serum sodium", "mmol/L", "135-145"),
    ("thrombocytocrit", "%", "0.11-0.28"),
    ("ESR", "mm/h", "men 0-15, women 0-20"),
    ("glutamic-pyruvic transaminase", "U/L", "7-40"),
    ("eGFR", "mL/min/1.73m²", "> 90"),
    ("creatinine", "µmol/L", "men 59-104, women 45-84"),
)
TJH_DROPPED_COLUMNS = ("2019-nCoV nucleic acid detection",)
# Columns shown under another name. "PH value" mixes urine dipstick steps (5.0, 5.5, 6.0, ...) with blood
# values (244 of 384 values are below 7.0): a blood label and range would tell the LLM that a urine pH of 6
# is severe acidaemia, so it is named for what it is and gets no normal range.
TJH_DISPLAY_NAMES = {"PH value": "pH (urine or blood sample, source not recorded)"}

TJH_FEATURES: tuple[FeatureSpec, ...] = DEMOGRAPHICS + tuple(
    FeatureSpec(TJH_DISPLAY_NAMES.get(n, n), u, r) for n, u, r in TJH_LABS
)


@dataclass(frozen=True)
class ChartVariable:
    """A MIMIC-IV chartevents variable: the itemids that measure it and how to convert them."""

    spec: FeatureSpec
    itemids: tuple[int, ...]
    plausible: tuple[float, float]
    """Physiologically possible values (inclusive, in ``spec.unit`` after conversion); others become missing."""
    convert: tuple[tuple[int, str], ...] = ()
    """(itemid, conversion) pairs: 'f_to_c', 'inch_to_cm', 'lbs_to_kg', 'percent_to_fraction'."""


def _cv(name, unit, normal, itemids, plausible, convert=(), binary=False) -> ChartVariable:
    return ChartVariable(FeatureSpec(name, unit, normal, binary=binary), tuple(itemids), tuple(plausible), tuple(convert))


# The 17 mimic3-benchmark clinical variables (METHOD.md §1). GCS total is derived from its components.
MIMIC_VARIABLES: tuple[ChartVariable, ...] = (  # [ours] plausibility ranges: wide physiological limits
    _cv("Capillary refill rate", "", "0 normal (<3 s), 1 abnormal", (223951, 224308), (0, 1), binary=True),
    _cv("Diastolic blood pressure", "mmHg", "60-80", (220051, 220180, 224643, 225310), (0, 300)),
    _cv("Fraction inspired oxygen", "fraction", "0.21 on room air", (223835,), (0.2, 1.0), [(223835, "percent_to_fraction")]),
    _cv("Glasgow coma scale eye opening", "points", "4", (220739,), (1, 4)),
    _cv("Glasgow coma scale motor response", "points", "6", (223901,), (1, 6)),
    _cv("Glasgow coma scale total", "points", "15", (), (3, 15)),
    _cv("Glasgow coma scale verbal response", "points", "5", (223900,), (1, 5)),
    _cv("Glucose", "mg/dL", "70-140", (220621, 225664, 226537), (1, 2000)),
    _cv("Heart rate", "bpm", "60-100", (220045,), (0, 350)),
    _cv("Height", "cm", "", (226707, 226730), (50, 250), [(226707, "inch_to_cm")]),
    _cv("Mean blood pressure", "mmHg", "70-100", (220052, 220181, 224322, 225312), (0, 330)),
    _cv("Oxygen saturation", "%", "95-100", (220227, 220277), (0, 100)),
    _cv("Respiratory rate", "breaths/min", "12-20", (220210, 224422, 224689, 224690), (0, 150)),
    _cv("Systolic blood pressure", "mmHg", "90-120", (220050, 220179, 224167, 225309, 227243), (0, 400)),
    _cv("Temperature", "°C", "36.1-37.2", (223761, 223762), (25, 45), [(223761, "f_to_c")]),
    _cv("Weight", "kg", "", (226512, 226531), (20, 400), [(226531, "lbs_to_kg")]),
    _cv("pH", "", "7.35-7.45", (220274, 223830), (6.3, 8.4)),
)
GCS_COMPONENTS = (
    "Glasgow coma scale eye opening",
    "Glasgow coma scale motor response",
    "Glasgow coma scale verbal response",
)
GCS_TOTAL = "Glasgow coma scale total"
# Capillary refill is charted as text: CareVue spellings (MIMIC-III, the demo) and MetaVision's (full MIMIC-IV),
# matched lower-cased and stripped.
CAPILLARY_REFILL_TEXT = {
    "normal <3 secs": 0.0,
    "abnormal >3 secs": 1.0,
    "normal <3 seconds": 0.0,
    "abnormal >3 seconds": 1.0,
    "brisk": 0.0,
    "delayed": 1.0,
}

MIMIC_FEATURES: tuple[FeatureSpec, ...] = DEMOGRAPHICS + tuple(v.spec for v in MIMIC_VARIABLES)

# The synthetic cohort (eagrl.data.synthetic): 20 lab-like variables, the outcome a known rule over three of them.
SYNTHETIC_FEATURES: tuple[FeatureSpec, ...] = DEMOGRAPHICS + tuple(
    FeatureSpec(name, unit, normal)
    for name, unit, normal in (
        ("Lactate", "mmol/L", "0.5-2.2"),
        ("Creatinine", "mg/dL", "0.6-1.3"),
        ("Albumin", "g/dL", "3.5-5"),
        ("Sodium", "mmol/L", "135-145"),
        ("Potassium", "mmol/L", "3.5-5.1"),
        ("Chloride", "mmol/L", "96-106"),
        ("Bicarbonate", "mmol/L", "22-29"),
        ("Glucose", "mg/dL", "70-110"),
        ("Hemoglobin", "g/dL", "12-17"),
        ("Platelets", "x10^9/L", "150-450"),
        ("White blood cells", "x10^9/L", "4-11"),
        ("Urea nitrogen", "mg/dL", "7-20"),
        ("Bilirubin", "mg/dL", "0.3-1.2"),
        ("ALT", "U/L", "7-56"),
        ("CRP", "mg/L", "< 10"),
        ("Troponin", "ng/L", "< 14"),
        ("Heart rate", "beats/min", "60-100"),
        ("Respiratory rate", "breaths/min", "12-20"),
        ("Oxygen saturation", "%", "95-100"),
        ("Temperature", "°C", "36.1-37.2"),
    )
)

DATASET_FEATURES = {"tjh": TJH_FEATURES, "mimic_iv": MIMIC_FEATURES, "meds": MIMIC_FEATURES, "synthetic": SYNTHETIC_FEATURES}
DATASET_TASKS = {"tjh": ("mortality",), "mimic_iv": ("mortality", "readmission"), "meds": ("mortality", "readmission"), "synthetic": ("mortality",)}


def resolve_feature_names(wanted: list[str], dataset: str) -> list[str]:
    """The dataset's own names of ``wanted`` (written as the names or as the answer parser's aliases, e.g. "LDH",
    "hs-CRP", "lymphocyte %" on TJH), in the dataset's order. An unknown name raises ``EAGRLInputError`` listing
    its close matches."""
    import difflib

    from eagrl.errors import EAGRLInputError
    from eagrl.llm.parsing import FeatureMatcher, normalise_name

    names = [f.name for f in DATASET_FEATURES[dataset]]
    matcher = FeatureMatcher(names)
    found, unknown = set(), []
    for written in wanted:
        name = matcher.match(written)
        if name is None:
            unknown.append(written)
        else:
            found.add(name)
    if unknown:
        by_key = {normalise_name(n): n for n in names} | {normalise_name(k): k for k in matcher.table}
        hints = [f"{w!r} (close: {[by_key[c] for c in difflib.get_close_matches(normalise_name(w), list(by_key), n=3, cutoff=0.5)] or 'none'})" for w in unknown]
        raise EAGRLInputError(f"data.features: unknown feature name(s) for {dataset}: {'; '.join(hints)}")
    if not found:
        raise EAGRLInputError("data.features: give at least one feature name (or leave it unset for every feature)")
    return [n for n in names if n in found]
