"""The in-memory cohort: per-sample daily rows, stored flat with offsets (ragged arrays).

``RawCohort`` is what a dataset reader returns: raw daily values (NaN where not measured), day
numbers and labels. ``PreparedCohort`` adds the split, the train-only normalisation statistics, the
normalised and imputed values, and the missing mask. Both are plain numpy, so they can be cached with
``np.savez`` and loaded without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eagrl.data.features import FeatureSpec

SPLITS = ("train", "val", "test")


@dataclass
class RawCohort:
    """Daily, un-normalised samples of one dataset. N samples, R daily rows in all, F features."""

    dataset: str
    features: tuple[FeatureSpec, ...]
    sample_ids: np.ndarray  # [N] str: TJH patient id, MIMIC-IV stay_id
    patient_ids: np.ndarray  # [N] str: the unit of splitting (MIMIC-IV subject_id)
    offsets: np.ndarray  # [N + 1] int64: rows of sample i are offsets[i]:offsets[i+1]
    values: np.ndarray  # [R, F] float32, NaN = not measured that day
    days: np.ndarray  # [R] int32, day of stay, 1 = first day with a record
    labels: dict[str, np.ndarray]  # task -> [N] int8 in {0, 1}
    exclusion: np.ndarray | None = None  # [N] str: why a sample leaves the cohort ("" = kept); None: all kept
    notes: dict = field(default_factory=dict)  # what the reader did (rows dropped, values made missing), JSON-able

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    @property
    def kept(self) -> np.ndarray:
        """[N] bool: the samples no cohort rule excludes."""
        return np.ones(self.num_samples, bool) if self.exclusion is None else self.exclusion == ""

    def subset(self, keep: np.ndarray) -> "RawCohort":
        """The samples where ``keep`` [N] bool is True, with their rows, in the same order."""
        counts = np.diff(self.offsets)  # [N]
        row_keep = np.repeat(keep, counts)  # [R]
        offsets = np.zeros(int(keep.sum()) + 1, np.int64)
        offsets[1:] = np.cumsum(counts[keep])
        return RawCohort(
            dataset=self.dataset,
            features=self.features,
            sample_ids=self.sample_ids[keep],
            patient_ids=self.patient_ids[keep],
            offsets=offsets,
            values=self.values[row_keep],
            days=self.days[row_keep],
            labels={task: y[keep] for task, y in self.labels.items()},
            exclusion=None if self.exclusion is None else self.exclusion[keep],
            notes=self.notes,
        )

    def select_features(self, names: list[str]) -> "RawCohort":
        """The same samples with only the features ``names`` (the dataset's own names), in the dataset's order;
        the demographics (Sex, Age) are always kept: ConCare reads them as its demographic token."""
        wanted = set(names)
        keep = [j for j, f in enumerate(self.features) if f.demographic or f.name in wanted]
        return RawCohort(
            dataset=self.dataset,
            features=tuple(self.features[j] for j in keep),
            sample_ids=self.sample_ids,
            patient_ids=self.patient_ids,
            offsets=self.offsets,
            values=np.ascontiguousarray(self.values[:, keep]),
            days=self.days,
            labels=self.labels,
            exclusion=self.exclusion,
            notes=self.notes,
        )


@dataclass
class NormStats:
    """Train-only statistics per feature: z-score mean/std and the median used to impute leading gaps."""

    mean: np.ndarray  # [F] float64 (0 for binary features)
    std: np.ndarray  # [F] float64 (1 for binary features)
    median: np.ndarray  # [F] float64, raw units; NaN when train never measured the feature

    @classmethod
    def none(cls, n_features: int) -> "NormStats":
        """Placeholder statistics (mean 0, std 1, no median) of a cohort whose statistics come later, from the
        model's training cohort (``split: all``)."""
        return cls(np.zeros(n_features), np.ones(n_features), np.full(n_features, np.nan))

    def as_lists(self) -> dict[str, list[float]]:
        """Plain lists (what a checkpoint holds, loadable with ``weights_only=True``)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "median": self.median.tolist()}


@dataclass
class PreparedCohort:
    """A cohort ready for training: split, normalised with train statistics, imputed."""

    raw: RawCohort
    split: np.ndarray  # [N] str in SPLITS
    stats: NormStats
    normalised: np.ndarray  # [R, F] float32, z-scored, carry-forward then train-median imputed
    missing: np.ndarray  # [R, F] bool, True where the raw value was not measured
    meta: dict = field(default_factory=dict)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)
