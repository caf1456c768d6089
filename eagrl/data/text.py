"""Serialise one patient for the LLM (METHOD.md §1), and the dataset personas.

Raw (un-normalised) values with units and normal ranges; ``NA`` where nothing was measured that
day (imputed values are never shown as measured). Optional: show only the last ``max_visits`` visits,
and permute the order of a fraction of the feature lines (the robustness study), reproducibly from a
seed and the sample id.
"""

from __future__ import annotations

import zlib

import numpy as np

from eagrl.data.features import FeatureSpec
from eagrl.errors import EAGRLInputError

PERSONAS = {
    "tjh": (
        "You are an experienced clinician treating hospitalised COVID-19 patients at Tongji Hospital, Wuhan. "
        "You read a patient's laboratory results, day by day, and judge the patient's prognosis."
    ),
    "mimic_iv": (
        "You are an experienced intensive care physician. "
        "You read a patient's vital signs and bedside measurements from an ICU stay, day by day, and judge the patient's prognosis."
    ),
}
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


def serialize_patient(
    values: np.ndarray,
    days: np.ndarray,
    features: tuple[FeatureSpec, ...],
    *,
    sample_id: str = "",
    max_visits: int | None = None,
    shuffle_fraction: float = 0.0,
    shuffle_seed: int = 0,
) -> str:
    """Text for one sample. values: [T, F] raw with NaN; days: [T]; features: the F specs."""
    if max_visits is not None:
        if max_visits <= 0:
            raise EAGRLInputError(f"max_visits must be a positive number of visits, got {max_visits}")
        values, days = values[-max_visits:], days[-max_visits:]
    names = [f.name for f in features]
    sex, age = values[0, names.index("Sex")], values[0, names.index("Age")]
    sex_text = "patient of unknown sex" if np.isnan(sex) else ("male" if sex >= 0.5 else "female")
    age_text = "of unknown age" if np.isnan(age) else f"aged {int(round(float(age)))} years"
    visits = len(days)
    day_list = _join([str(int(d)) for d in days])
    lines = [
        f"The patient is a {sex_text}, {age_text}. "
        f"The patient had {visits} visit{'s' if visits != 1 else ''}, on day{'s' if visits != 1 else ''} {day_list} of the stay.",
        "Feature values per visit (unit; normal range):",
    ]
    dynamic = [j for j, f in enumerate(features) if not f.demographic]
    order = shuffled_order(len(dynamic), shuffle_fraction, shuffle_seed, sample_id)
    for position in order:
        j = dynamic[position]
        spec = features[j]
        detail = "; ".join([spec.unit or "no unit", spec.normal_range or "no range"])
        series = ", ".join(format_value(float(v)) for v in values[:, j])
        lines.append(f'- {spec.name} ({detail}): "{series}"')
    return "\n".join(lines)
