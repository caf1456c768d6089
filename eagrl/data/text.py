"""Serialise one patient for the LLM (METHOD.md §1), and the dataset personas.

Two text styles, both with raw (un-normalised) values and units, and never an imputed value:

- ``paper`` (the paper's format): per feature, its unit, normal range and the value at every visit, ``NA``
  where nothing was measured that day. TJH prompts run to ~3,000 tokens (73 labs per visit).
- ``compact`` (ours): one line per *measured* variable with its last value, unit, an H/L flag against the
  normal range, and over the observation its min, max and direction; variables within range at every
  measurement share one line by name; unmeasured variables are listed once by name. About a third of the
  paper style's tokens on TJH.

Options: show only the last ``max_visits`` visits, and permute the order of a fraction of the features
(the robustness study), reproducibly from a seed and the sample id. In the compact style the permutation
is applied to the variables before they are grouped.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from eagrl.data.features import FeatureSpec
from eagrl.errors import EAGRLInputError

PERSONAS = {
    "tjh": (
        "You are an experienced clinician treating hospitalised COVID-19 patients at Tongji Hospital, Wuhan. "
        "You read a patient's laboratory results, day by day, and judge the patient's prognosis."
    ),
    "synthetic": (  # eagrl.data.synthetic: generated patients, a known rule
        "You are an experienced hospital physician. "
        "You read a patient's laboratory results and vital signs, day by day, and judge the patient's prognosis."
    ),
    "mimic_iv": (
        "You are an experienced intensive care physician. "
        "You read a patient's vital signs and bedside measurements from an ICU stay, day by day, and judge the patient's prognosis."
    ),
}
PERSONAS["meds"] = PERSONAS["mimic_iv"]  # a MEDS cohort's ICU stays, with MIMIC-IV's variables (eagrl.data.meds)
TASK_QUESTIONS = {
    "mortality": "What is the probability that this patient dies before leaving hospital (in-hospital mortality)?",
    "readmission": (
        "What is the probability that this patient is readmitted to the ICU within 30 days of leaving it, "
        "including death during this ICU stay or within 30 days after it?"
    ),
    "readmission_hospital": (  # readmission_level: hospital (in-hospital deaths are not in that cohort)
        "The patient survives this hospital admission. What is the probability that this patient is admitted to "
        "hospital again within 30 days of discharge?"
    ),
}


def question_key(task: str, readmission_level: str = "icu") -> str:
    """The ``TASK_QUESTIONS`` key of a task (readmission: at the ICU or the hospital level)."""
    return "readmission_hospital" if task == "readmission" and readmission_level == "hospital" else task


def system_prompt(dataset: str, task: str) -> str:
    """The persona and the question; ``task`` is a ``TASK_QUESTIONS`` key (see ``question_key``)."""
    if dataset not in PERSONAS:
        raise EAGRLInputError(f"unknown dataset {dataset!r}: expected one of {sorted(PERSONAS)}")
    if task not in TASK_QUESTIONS:
        raise EAGRLInputError(f"unknown task {task!r}: expected one of {sorted(TASK_QUESTIONS)}")
    return f"{PERSONAS[dataset]} {TASK_QUESTIONS[task]}"


def format_value(value: float) -> str:
    """A short, exact-looking number: at most two decimals for |x| >= 1, three significant digits below."""
    if np.isnan(value):
        return "NA"
    if value == 0:
        return "0"
    if abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = np.format_float_positional(float(f"{value:.3g}"), trim="-")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shuffled_order(num_features: int, fraction: float, seed: int, sample_id: str) -> np.ndarray:
    """Positions of the feature lines after moving ``round(fraction * F)`` of them among themselves.

    The chosen lines are rotated along a random cycle, so every chosen line leaves its place; the
    other lines stay. The permutation depends only on (seed, sample id, F, fraction).
    """
    if not 0.0 <= fraction <= 1.0:
        raise EAGRLInputError(f"shuffle_fraction must be within [0, 1], got {fraction}")
    order = np.arange(num_features)
    k = int(round(fraction * num_features))
    if k < 2:
        return order
    rng = np.random.default_rng([seed, zlib.crc32(str(sample_id).encode())])
    chosen = rng.choice(num_features, size=k, replace=False)  # a random cycle over the chosen slots
    order[chosen] = order[np.roll(chosen, 1)]
    return order


TextStyle = Literal["paper", "compact"]
TEXT_STYLES = ("paper", "compact")
TREND_TOLERANCE = 0.05
"""Compact style: a last value within 5% of the first measured one (relative to |first|) is "stable"."""


@dataclass(frozen=True)
class NormalBounds:
    """A normal range as numbers: normal is low <= x <= high, with ``<``/``>`` ranges strict at their edge.

    A value below ``low`` (or equal to it, when ``strict_low``) is flagged L; above ``high`` (or equal, when
    ``strict_high``) is flagged H."""

    low: float = -np.inf
    high: float = np.inf
    strict_low: bool = False
    strict_high: bool = False

    def inside(self) -> float:
        """One value within the range: its middle, or next to a one-sided range's bound."""
        if np.isfinite(self.low) and np.isfinite(self.high):
            return (self.low + self.high) / 2
        if np.isfinite(self.high):
            return float(np.nextafter(self.high, -np.inf))
        return float(np.nextafter(self.low, np.inf))

    def flag(self, value: float) -> str:
        """``"H"``, ``"L"`` or ``""`` (within the range)."""
        if value < self.low or (self.strict_low and value == self.low):
            return "L"
        if value > self.high or (self.strict_high and value == self.high):
            return "H"
        return ""


_NUMBER = r"-?\d+(?:\.\d+)?"


def normal_bounds(text: str, sex: float = np.nan) -> NormalBounds | None:
    """Parse a catalogue normal range (``FeatureSpec.normal_range``) for a patient of ``sex`` (1 male, 0
    female, NaN unknown). None where no range applies (""). Forms: ``"60-100"``, ``"< 14"``, ``"> 90"``,
    ``"men 140-180, women 120-160"`` (unknown sex: normal within either), and a single normal value with an
    optional comment (``"15"``, ``"0.21 on room air"``, ``"0 normal (<3 s), 1 abnormal"``)."""
    text = text.strip()
    if not text:
        return None
    by_sex = re.fullmatch(rf"men ({_NUMBER})-({_NUMBER}), women ({_NUMBER})-({_NUMBER})", text)
    if by_sex:
        men_low, men_high, women_low, women_high = map(float, by_sex.groups())
        if np.isnan(sex):
            return NormalBounds(min(men_low, women_low), max(men_high, women_high))
        return NormalBounds(men_low, men_high) if sex >= 0.5 else NormalBounds(women_low, women_high)
    interval = re.fullmatch(rf"({_NUMBER})-({_NUMBER})", text)
    if interval:
        return NormalBounds(float(interval.group(1)), float(interval.group(2)))
    one_sided = re.fullmatch(rf"([<>]) ({_NUMBER})", text)
    if one_sided:
        bound = float(one_sided.group(2))
        return NormalBounds(high=bound, strict_high=True) if one_sided.group(1) == "<" else NormalBounds(low=bound, strict_low=True)
    single = re.match(rf"({_NUMBER})(?:\s|$)", text)
    if single:
        return NormalBounds(float(single.group(1)), float(single.group(1)))
    raise EAGRLInputError(f"normal range {text!r} is not one of the forms 'a-b', '< x', '> x', 'men a-b, women c-d' or 'x ...'")


def trend(first: float, last: float) -> str:
    """``rising``, ``falling`` or ``stable`` (within ``TREND_TOLERANCE`` of |first|) from first to last value."""
    scale = abs(first) if first != 0 else 1.0
    change = (last - first) / scale
    if change > TREND_TOLERANCE:
        return "rising"
    if change < -TREND_TOLERANCE:
        return "falling"
    return "stable"


def _header(values: np.ndarray, days: np.ndarray, names: list[str]) -> str:
    sex, age = values[0, names.index("Sex")], values[0, names.index("Age")]
    sex_text = "patient of unknown sex" if np.isnan(sex) else ("male" if sex >= 0.5 else "female")
    age_text = "of unknown age" if np.isnan(age) else f"aged {int(round(float(age)))} years"
    visits = len(days)
    day_list = _join([str(int(d)) for d in days])
    return (
        f"The patient is a {sex_text}, {age_text}. "
        f"The patient had {visits} visit{'s' if visits != 1 else ''}, on day{'s' if visits != 1 else ''} {day_list} of the stay."
    )


def _paper_lines(values: np.ndarray, features: tuple[FeatureSpec, ...], order: list[int]) -> list[str]:
    lines = ["Feature values per visit (unit; normal range):"]
    for j in order:
        spec = features[j]
        detail = "; ".join([spec.unit or "no unit", spec.normal_range or "no range"])
        series = ", ".join(format_value(float(v)) for v in values[:, j])
        lines.append(f'- {spec.name} ({detail}): "{series}"')
    return lines


def shown_flags(series: np.ndarray, bounds: NormalBounds | None) -> list[str]:
    """Compact style: the H/L flag of each measured value [n] as the text writes it ([] where no range applies). A
    feature with a range and no flag is named "within the normal range", its values not written."""
    return [bounds.flag(float(format_value(float(v)))) for v in series] if bounds is not None else []


def shown_values(values: np.ndarray, features: tuple[FeatureSpec, ...], style: TextStyle = "paper") -> np.ndarray:
    """What the text of one sample tells of each feature, as a number to rank patients by. values: [T, F] raw with NaN
    (the visits shown) -> [F]: the last measured value (NaN: never measured); the demographics as the header gives
    them. ``compact``: a feature within its normal range at every measurement is written as "normal" without its value,
    so it gets one shared value inside the range (``NormalBounds.inside``), between the text's L and H values."""
    names = [f.name for f in features]
    sex = float(values[0, names.index("Sex")])
    out = np.full(len(features), np.nan)
    for j, spec in enumerate(features):
        series = values[:, j][~np.isnan(values[:, j])]  # [n measured]
        if series.size == 0:
            continue
        bounds = normal_bounds(spec.normal_range, sex) if style == "compact" and not spec.demographic else None
        if bounds is not None and not any(shown_flags(series, bounds)):
            out[j] = bounds.inside()
        else:
            out[j] = series[-1]
    return out


def _compact_lines(values: np.ndarray, features: tuple[FeatureSpec, ...], order: list[int], sex: float) -> list[str]:
    """values: [T, F] raw with NaN; ``order``: the dynamic feature columns in display order."""
    lines = ["Per measured feature: last value (H/L: above/below normal range); min-max over the visits, trend:"]
    normal, unmeasured = [], []
    for j in order:
        spec = features[j]
        series = values[:, j][~np.isnan(values[:, j])]  # [n measured]
        if series.size == 0:
            unmeasured.append(spec.name)
            continue
        bounds = normal_bounds(spec.normal_range, sex)
        flags = shown_flags(series, bounds)
        if bounds is not None and not any(flags):
            normal.append(spec.name)
            continue
        last = float(series[-1])
        value = f"{format_value(last)} {spec.unit}".rstrip()
        flag = f" {flags[-1]}" if flags and flags[-1] else ""
        if series.size == 1:
            course = "measured once"
        elif series.min() == series.max():
            course = f"the same at all {series.size} measurements"
        else:
            course = f"{format_value(float(series.min()))}-{format_value(float(series.max()))}, {trend(float(series[0]), last)}"
        lines.append(f"- {spec.name}: {value}{flag}; {course}")
    if normal:
        lines.append(f"Within the normal range at every measurement: {'; '.join(normal)}.")
    if unmeasured:
        lines.append(f"Not measured: {'; '.join(unmeasured)}.")
    return lines


def serialize_patient(
    values: np.ndarray,
    days: np.ndarray,
    features: tuple[FeatureSpec, ...],
    *,
    sample_id: str = "",
    max_visits: int | None = None,
    shuffle_fraction: float = 0.0,
    shuffle_seed: int = 0,
    style: TextStyle = "paper",
    omit: Sequence[str] = (),
) -> str:
    """Text for one sample. values: [T, F] raw with NaN; days: [T]; features: the F specs; ``omit``: names of
    features left out (those an external cohort lacks: ``data.allow_missing_features``)."""
    if style not in TEXT_STYLES:
        raise EAGRLInputError(f"text style {style!r} is unknown: expected one of {list(TEXT_STYLES)}")
    if max_visits is not None:
        if max_visits <= 0:
            raise EAGRLInputError(f"max_visits must be a positive number of visits, got {max_visits}")
        values, days = values[-max_visits:], days[-max_visits:]
    names = [f.name for f in features]
    dynamic = [j for j, f in enumerate(features) if not f.demographic and f.name not in omit]
    order = [dynamic[p] for p in shuffled_order(len(dynamic), shuffle_fraction, shuffle_seed, sample_id)]
    if style == "compact":
        body = _compact_lines(values, features, order, float(values[0, names.index("Sex")]))
    else:
        body = _paper_lines(values, features, order)
    return "\n".join([_header(values, days, names), *body])
