"""Binary-outcome metrics shared by every stage: AUROC, AUPRC, F1 and accuracy, with bootstrap.

The paper's protocol (METHOD.md §6): mean ± std over 100 seeded bootstrap resamples of the test set.
``bootstrap_metrics`` returns ``{name: mean, name_std: std}``; resamples that hold a single class
(where AUROC is undefined) are drawn again, so every resample is valid.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
)

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


def bootstrap_metrics(
    probs: torch.Tensor, labels: torch.Tensor, n_bootstrap: int = 100, seed: int = 0, threshold: float = 0.5
) -> dict[str, float]:
    """Mean and std of ``binary_metrics`` over ``n_bootstrap`` resamples with replacement."""
    probs, labels = probs.detach().float().flatten().cpu(), labels.detach().flatten().long().cpu()
    n = probs.numel()
    if n_bootstrap <= 0:
        return binary_metrics(probs, labels, threshold)
    if labels.min() == labels.max():  # a single class: no valid resample exists
        point = binary_metrics(probs, labels, threshold)
        return {**point, **{f"{k}_std": float("nan") for k in point}}
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float]] = []
    while len(rows) < n_bootstrap:
        index = torch.from_numpy(rng.integers(0, n, size=n))
        sample_labels = labels[index]
        if sample_labels.min() == sample_labels.max():
            continue
        rows.append(binary_metrics(probs[index], sample_labels, threshold))
    out: dict[str, float] = {}
    for name in METRICS:
        values = np.array([row[name] for row in rows])
        out[name] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
