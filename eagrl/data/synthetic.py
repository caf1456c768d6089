"""A synthetic cohort whose answer is known: the mechanism check of the whole pipeline.

``dataset: synthetic`` generates, from a seed, patients with 20 named lab-like variables over 2-4 daily
visits and an in-hospital mortality label drawn from a known rule over three of them (``RULE_FEATURES``),
with noise. It has the real cohorts' schema (``RawCohort``: Sex and Age first, NaN where a variable was not
measured that day), so every stage runs on it unchanged, and its compact text is short.

What it is for: ConCare's attention should rank the rule's variables first; EAG-RL, rewarded for naming
them, should learn to name them (R_att -> 1) and predict better than GRPO, which is not told about them. If
that fails here, the pipeline cannot learn; if it works here and not on TJH, the model is too small for TJH.

The rule (on the last visit's values, which the compact text shows first):

    logit = 1.6 * (lactate - 2.0) + 1.4 * (creatinine - 1.2) / 0.5 + 1.2 * (3.5 - albumin) / 0.5
    y ~ Bernoulli(sigmoid(logit / temperature)), temperature 0.5 by default

With the defaults (500 patients, seed 0): 32% positive; the rule's logit itself reaches AUROC 0.97 (the noise
ceiling), lactate alone 0.78, creatinine 0.68, albumin 0.78 (low is bad), every other variable ~0.5.

Every other variable is drawn independently of the outcome. No row is a real patient.
"""

from __future__ import annotations

import numpy as np

from eagrl.data.cohort import RawCohort
from eagrl.data.features import SYNTHETIC_FEATURES

# Per variable of ``SYNTHETIC_FEATURES`` (in its order): (normal mean, normal sd, abnormal shift in sds). An abnormal
# patient's baseline is shifted by that many sds, times a severity in [0.5, 1.5] (sign: the side the range is left on).
_PARAMS: dict[str, tuple[float, float, float]] = {
    "Lactate": (1.4, 0.35, 4.0),
    "Creatinine": (0.95, 0.18, 4.0),
    "Albumin": (4.2, 0.3, -3.5),
    "Sodium": (140.0, 2.2, 3.5),
    "Potassium": (4.3, 0.35, 3.0),
    "Chloride": (101.0, 2.2, 3.5),
    "Bicarbonate": (25.5, 1.5, -3.5),
    "Glucose": (90.0, 9.0, 4.0),
    "Hemoglobin": (14.5, 1.1, -3.5),
    "Platelets": (280.0, 60.0, -3.0),
    "White blood cells": (7.5, 1.5, 3.5),
    "Urea nitrogen": (13.5, 2.8, 4.0),
    "Bilirubin": (0.75, 0.18, 4.0),
    "ALT": (30.0, 10.0, 4.0),
    "CRP": (4.0, 2.0, 6.0),
    "Troponin": (6.0, 2.5, 5.0),
    "Heart rate": (80.0, 8.0, 3.5),
    "Respiratory rate": (16.0, 1.6, 3.5),
    "Oxygen saturation": (97.5, 1.0, -4.0),
    "Temperature": (36.7, 0.22, 4.0),
}
LAB_NAMES = [f.name for f in SYNTHETIC_FEATURES if not f.demographic]
assert LAB_NAMES == list(_PARAMS), "the generator's parameters follow SYNTHETIC_FEATURES"
RULE_FEATURES = ("Lactate", "Creatinine", "Albumin")  # the variables the outcome depends on


def rule_logit(last: dict[str, np.ndarray]) -> np.ndarray:
    """The outcome's logit from the last visit's values of ``RULE_FEATURES`` ([N] each) -> [N]."""
    return 1.6 * (last["Lactate"] - 2.0) + 1.4 * (last["Creatinine"] - 1.2) / 0.5 + 1.2 * (3.5 - last["Albumin"]) / 0.5


def load_synthetic(
    n_patients: int = 500,
    seed: int = 0,
    abnormal_rate: float = 0.1,
    rule_abnormal_rate: float = 0.3,
    missing_rate: float = 0.1,
    temperature: float = 0.5,
) -> RawCohort:
    """Generate the cohort: ``n_patients`` patients, 2-4 daily visits each (see the module docstring).

    Args:
        n_patients: patients (one sample each).
        seed: the generator's seed (the same seed gives the same cohort).
        abnormal_rate: per patient and variable outside the rule, the chance its baseline lies outside the normal
            range (each abnormal variable costs a line of text).
        rule_abnormal_rate: the same for the rule's variables.
        missing_rate: per visit and variable, the chance it was not measured (the last visit's rule
            variables are always measured, so the rule is computable from the text).
        temperature: the label noise: the logit is divided by it before sampling (smaller: a sharper rule).
    """
    rng = np.random.default_rng(seed)
    n_labs = len(LAB_NAMES)
    mean, sd, shift = (np.array(column) for column in zip(*_PARAMS.values()))  # [L] each
    in_rule = np.isin(LAB_NAMES, RULE_FEATURES)  # [L]
    abnormal = rng.random((n_patients, n_labs)) < np.where(in_rule, rule_abnormal_rate, abnormal_rate)  # [N, L]
    severity = rng.uniform(0.5, 1.5, (n_patients, n_labs))  # [N, L]
    baseline = mean + sd * (rng.standard_normal((n_patients, n_labs)) * 0.8 + abnormal * shift * severity)  # [N, L]
    visits = rng.integers(2, 5, n_patients)  # [N] in 2..4
    drift = sd * rng.standard_normal((n_patients, n_labs)) * 0.4  # [N, L] per-visit trend

    rows, days, last = [], [], np.empty((n_patients, n_labs))
    sex = rng.integers(0, 2, n_patients).astype(np.float32)
    age = np.clip(rng.normal(62, 15, n_patients), 18, 95).round().astype(np.float32)
    rule_columns = [LAB_NAMES.index(name) for name in RULE_FEATURES]
    for i in range(n_patients):
        t = np.arange(visits[i])[:, None]  # [T, 1]
        noise = sd * rng.standard_normal((visits[i], n_labs)) * 0.25  # [T, L]
        values = baseline[i] + drift[i] * (t - visits[i] + 1) + noise  # [T, L], the last visit at the baseline
        values = np.maximum(values, 0.01 * mean)  # concentrations stay positive
        last[i] = values[-1]
        unmeasured = rng.random(values.shape) < missing_rate  # [T, L]
        unmeasured[-1, rule_columns] = False
        values = np.where(unmeasured, np.nan, values)
        demo = np.repeat([[sex[i], age[i]]], visits[i], axis=0)  # [T, 2]
        rows.append(np.concatenate([demo, values], axis=1).astype(np.float32))
        days.append(np.arange(1, visits[i] + 1, dtype=np.int32))

    logit = rule_logit({name: last[:, LAB_NAMES.index(name)] for name in RULE_FEATURES})  # [N]
    labels = (rng.random(n_patients) < 1.0 / (1.0 + np.exp(-logit / temperature))).astype(np.int8)
    offsets = np.zeros(n_patients + 1, np.int64)
    offsets[1:] = np.cumsum(visits)
    ids = np.array([f"S{i:05d}" for i in range(n_patients)])
    return RawCohort(
        dataset="synthetic",
        features=SYNTHETIC_FEATURES,
        sample_ids=ids,
        patient_ids=ids,
        offsets=offsets,
        values=np.concatenate(rows),
        days=np.concatenate(days),
        labels={"mortality": labels},
        notes={"rule_features": list(RULE_FEATURES), "generator_seed": seed},
    )
