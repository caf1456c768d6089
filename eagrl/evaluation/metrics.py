"""Binary-outcome metrics shared by every stage: AUROC, AUPRC, F1 and accuracy, with bootstrap.

The paper's protocol (METHOD.md §6): mean ± std over 100 seeded bootstrap resamples of the test set.
``bootstrap_metrics`` returns ``{name: mean, name_std: std, name_ci_low, name_ci_high}``: the mean and std
the paper reports, and the 95% percentile interval (2.5th and 97.5th percentiles of the resampled values).
``paired_difference`` compares two methods on the same patients over the same resamples: the difference
of a metric on the whole set, and its 95% percentile interval. Resamples that hold a single class (where
AUROC is undefined) are drawn again, so every resample is valid (``resamples``). ``shuffled_alignment`` asks
how much of a model's R_att is about the patient: its R_att against its own expert top-k and against other
patients'.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
)

from eagrl.rl.rewards import attention_alignment

METRICS = ("auroc", "auprc", "f1", "accuracy")


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, AUPRC (average precision), and F1/accuracy at ``threshold``. probs, labels: [N]."""
    probs, labels = probs.detach().float().flatten().cpu(), labels.detach().flatten().long().cpu()
    if probs.numel() == 0:
        raise ValueError("binary_metrics needs at least one prediction")
    two_classes = bool(labels.min() != labels.max())
    return {
        "auroc": float(binary_auroc(probs, labels)) if two_classes else float("nan"),
        "auprc": float(binary_average_precision(probs, labels)) if two_classes else float("nan"),
        "f1": float(binary_f1_score(probs, labels, threshold=threshold)),
        "accuracy": float(binary_accuracy(probs, labels, threshold=threshold)),
    }


def ranking(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of scores [N] for labels [N] holding both outcomes, in numpy: the paired
    bootstrap's inner loop (thousands of calls). Equal to torchmetrics' ``binary_auroc`` and
    ``binary_average_precision`` on probabilities (tests/unit/test_evaluation_stats.py), ties included. Any score
    works (a lab value): only the order counts, where torchmetrics passes scores outside [0, 1] through a sigmoid,
    which ties every score above ~37 (float64)."""
    p, y = probs.numpy().astype(np.float64), labels.numpy().astype(bool)
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), p.size - 1]  # the last index of every distinct score, descending
    tp = np.cumsum(y)[last].astype(np.float64)  # [thresholds]
    fp = (last + 1 - tp).astype(np.float64)
    positives, negatives = tp[-1], fp[-1]
    tpr, fpr = np.r_[0.0, tp / positives], np.r_[0.0, fp / negatives]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count one half
    precision, recall = tp / (tp + fp), np.r_[0.0, tp / positives]
    auprc = float(np.sum(np.diff(recall) * precision))  # step-wise, as average precision
    return {"auroc": auroc, "auprc": auprc}


def resamples(labels: torch.Tensor, n_bootstrap: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_bootstrap`` index vectors [N] drawn with replacement (seeded), each holding both outcomes."""
    labels = labels.detach().flatten().long().cpu()
    n = labels.numel()
    if n == 0 or labels.min() == labels.max():
        raise ValueError("a bootstrap resample needs both outcomes among the labels")
    rng = np.random.default_rng(seed)
    out: list[torch.Tensor] = []
    while len(out) < n_bootstrap:
        index = torch.from_numpy(rng.integers(0, n, size=n))
        if labels[index].min() != labels[index].max():
            out.append(index)
    return out


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of ``values``: its (1 - level)/2 and (1 + level)/2 quantiles."""
    values = np.asarray(values, dtype=float)
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bootstrap: int = 100, seed: int = 0, threshold: float = 0.5
) -> dict[str, float]:
    """Mean, std and 95% percentile interval of ``binary_metrics`` over ``n_bootstrap`` resamples."""
    probs, labels = probs.detach().float().flatten().cpu(), labels.detach().flatten().long().cpu()
    if n_bootstrap <= 0:
        return binary_metrics(probs, labels, threshold)
    if labels.min() == labels.max():  # a single class: no valid resample exists
        point = binary_metrics(probs, labels, threshold)
        undefined = {f"{k}_{suffix}": float("nan") for k in point for suffix in ("std", "ci_low", "ci_high")}
        return {**point, **undefined}
    rows = [binary_metrics(probs[index], labels[index], threshold) for index in resamples(labels, n_bootstrap, seed)]
    out: dict[str, float] = {}
    for name in METRICS:
        values = np.array([row[name] for row in rows])
        out[name] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = percentile_interval(values)
    return out


def paired_difference(
    probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Method a minus method b on the same N patients (probs_a, probs_b, labels: [N]), per ranking metric:
    ``delta_<m>`` on the whole set and ``delta_<m>_ci_low/high``, the ``level`` percentile interval of the
    difference over the same ``n_bootstrap`` resamples for both methods (so patient-level noise shared by
    the two cancels)."""
    probs_a, probs_b = probs_a.detach().float().flatten().cpu(), probs_b.detach().float().flatten().cpu()
    labels = labels.detach().flatten().long().cpu()
    if not probs_a.numel() == probs_b.numel() == labels.numel():
        raise ValueError(f"paired_difference needs one prediction per patient from each method: {probs_a.numel()}, {probs_b.numel()}, {labels.numel()}")
    whole_a, whole_b = ranking(probs_a, labels), ranking(probs_b, labels)
    deltas = {m: [] for m in ("auroc", "auprc")}
    for index in resamples(labels, n_bootstrap, seed):
        a, b = ranking(probs_a[index], labels[index]), ranking(probs_b[index], labels[index])
        for m in deltas:
            deltas[m].append(a[m] - b[m])
    out: dict[str, float] = {}
    for m, values in deltas.items():
        out[f"delta_{m}"] = whole_a[m] - whole_b[m]
        out[f"delta_{m}_ci_low"], out[f"delta_{m}_ci_high"] = percentile_interval(values, level)
    return out


def shuffled_alignment(
    predicted: Sequence[Iterable[str]], expert: Sequence[Iterable[str]], unknown: Optional[Sequence[int]] = None,
    n_permutations: int = 1000, seed: int = 0,
) -> dict[str, float]:
    """How much of a model's R_att is about the patient: the mean R_att of N answers scored against their own
    expert top-k (``own``), and against the expert top-k of the patients in a seeded random permutation, over
    ``n_permutations`` permutations (``shuffled``: their mean, ``shuffled_ci_low/high``: the 95% percentile interval).
    ``specific`` = own − shuffled: zero for a template that names the cohort's common features whoever the patient
    is, positive when the named features follow this patient's ranking. ``p`` = (1 + #permutations with a mean at
    least ``own``) / (1 + n_permutations), a one-sided permutation p-value. predicted, expert: N sets of names;
    unknown: [N] named items that are not features (as ``attention_alignment``)."""
    predicted, expert = [list(p) for p in predicted], [list(e) for e in expert]
    if len(predicted) != len(expert) or not predicted:
        raise ValueError(f"shuffled_alignment needs one expert set per answer, and at least one: {len(predicted)}, {len(expert)}")
    own = float(attention_alignment(predicted, expert, unknown).mean())
    rng = np.random.default_rng(seed)
    means = np.array([
        float(attention_alignment(predicted, [expert[j] for j in rng.permutation(len(expert))], unknown).mean())
        for _ in range(n_permutations)
    ])  # [n_permutations]
    low, high = percentile_interval(means)
    shuffled = float(means.mean())
    return {"own": own, "shuffled": shuffled, "shuffled_ci_low": low, "shuffled_ci_high": high,
            "specific": own - shuffled, "p": (1 + int((means >= own - 1e-12).sum())) / (1 + n_permutations)}  # fmt: skip


CALIBRATION_BINS = 10


def calibration(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = CALIBRATION_BINS) -> dict:
    """Calibration of predicted probabilities: the Brier score, the expected calibration error, and the
    reliability diagram's bins. probs, labels: [N].

    - Brier = mean((ŷ − y)²).
    - ECE = Σ_b (n_b / N) |mean ŷ in b − share of positives in b| over ``n_bins`` equal-width bins of ŷ on
      [0, 1] (torchmetrics' ``binary_calibration_error``, L1 norm).
    - bins: per bin with patients, ``{"low", "high", "mean_prediction", "observed", "patients"}`` (a bin holds
      low < ŷ <= high; the first also ŷ = 0), the points of the reliability diagram.
    """
    from torchmetrics.functional.classification import binary_calibration_error

    probs, labels = probs.detach().double().flatten().cpu(), labels.detach().flatten().long().cpu()  # [N], [N]
    if probs.numel() == 0:
        raise ValueError("calibration needs at least one prediction")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.double)  # [n_bins + 1]
    which = torch.bucketize(probs, edges[1:-1], right=False)  # [N] bin index: edges[b] < p <= edges[b + 1]
    bins = []
    for b in range(n_bins):
        inside = which == b
        if inside.any():
            bins.append({
                "low": float(edges[b]), "high": float(edges[b + 1]), "mean_prediction": float(probs[inside].mean()),
                "observed": float(labels[inside].double().mean()), "patients": int(inside.sum()),
            })  # fmt: skip
    return {
        "brier": float(((probs - labels.double()) ** 2).mean()),
        "ece": float(binary_calibration_error(probs.float(), labels, n_bins=n_bins, norm="l1")),
        "bins": bins,
    }


SUBGROUPS = (  # (key, title): by sex, and by age band at the stay (years)
    ("sex_male", "male"),
    ("sex_female", "female"),
    ("age_lt50", "age < 50"),
    ("age_50_70", "age 50-70"),
    ("age_gt70", "age > 70"),
)
MIN_SUBGROUP_CLASS = 10  # fewer positives or negatives than this: the subgroup is too small for a number


def subgroup_masks(sex: torch.Tensor, age: torch.Tensor) -> dict[str, torch.Tensor]:
    """{subgroup key: [N] bool}. sex: [N] 1 male, 0 female (NaN unknown: in neither); age: [N] years (NaN: in no band);
    the bands are age < 50, 50 <= age <= 70 and age > 70."""
    sex, age = sex.detach().double().flatten().cpu(), age.detach().double().flatten().cpu()
    return {
        "sex_male": sex == 1, "sex_female": sex == 0,
        "age_lt50": age < 50, "age_50_70": (age >= 50) & (age <= 70), "age_gt70": age > 70,
    }  # fmt: skip


def subgroup_metrics(probs: torch.Tensor, labels: torch.Tensor, sex: torch.Tensor, age: torch.Tensor, min_each: int = MIN_SUBGROUP_CLASS) -> dict[str, float]:
    """AUROC and AUPRC per subgroup (``SUBGROUPS``), flat as ``metrics.json`` holds them: for each key
    ``subgroup_<key>_patients`` and ``subgroup_<key>_positives``, and ``subgroup_<key>_auroc`` / ``_auprc`` only
    when the subgroup holds at least ``min_each`` positives and ``min_each`` negatives (else it is too small
    for a number). probs, labels, sex, age: [N]."""
    probs, labels = probs.detach().double().flatten().cpu(), labels.detach().flatten().long().cpu()
    out: dict[str, float] = {}
    for key, mask in subgroup_masks(sex, age).items():
        n, positives = int(mask.sum()), int(labels[mask].sum())
        out[f"subgroup_{key}_patients"], out[f"subgroup_{key}_positives"] = float(n), float(positives)
        if positives >= min_each and n - positives >= min_each:
            found = binary_metrics(probs[mask], labels[mask])
            out[f"subgroup_{key}_auroc"], out[f"subgroup_{key}_auprc"] = found["auroc"], found["auprc"]
    return out
