"""Split, normalise and impute a raw cohort (METHOD.md §1), and cache the result on disk.

- Split: the published TJH split, a split file, or a seeded patient-level split stratified on mortality (no patient
  in two splits).
- Normalisation: z-score with mean/std from TRAIN rows only, computed on the values strictly between
  the train 5th and 95th percentiles; binary features are left as 0/1.
- Imputation: carry the last measurement forward within a sample; before the first measurement use
  the train median. ``missing`` keeps the truth about what was measured.
- Cache: ``<cache>/datasets/<dataset>/<key>/`` holds ``arrays.npz`` and ``manifest.json`` (preprocessing
  version, options, source fingerprints, the arrays' checksum). A changed source, version or option
  rebuilds; a cache whose checksum does not match (an interrupted or truncated write) is rebuilt, never
  trusted. Both files are written to temporary names and renamed, the manifest last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from eagrl.data.cohort import SPLITS, NormStats, PreparedCohort, RawCohort
from eagrl.data.features import DATASET_FEATURES, FeatureSpec
from eagrl.errors import EAGRLInputError
from eagrl.io import atomic_path, sha256_file, write_json_atomic, write_text_atomic

PREPROCESS_VERSION = 3  # 2: cohort rules (labels, post-discharge rows, windows, exclusions, plausibility); 3: MIMIC-IV ties at one charttime
_FULL_HASH_LIMIT = 512 * 1024 * 1024  # files larger than this are fingerprinted by size and mtime

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- splits
def stratified_patient_split(
    patient_ids: np.ndarray, labels: np.ndarray, ratios: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign every sample a split so that all samples of one patient share it.

    Patients are stratified on their label (positive if any of their samples is positive) and each
    stratum is cut by ``ratios`` (train, val, test) after a seeded shuffle.
    """
    ratios_arr = np.asarray(ratios, dtype=np.float64)
    if ratios_arr.shape != (3,) or (ratios_arr < 0).any() or ratios_arr.sum() <= 0:
        raise EAGRLInputError(f"split_ratios must be three non-negative numbers (train, val, test), got {ratios}")
    ratios_arr = ratios_arr / ratios_arr.sum()
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    patient_label = np.zeros(len(patients), np.int8)
    np.maximum.at(patient_label, inverse, labels.astype(np.int8))
    rng = np.random.default_rng(seed)
    patient_split = np.empty(len(patients), dtype=object)
    for stratum in (0, 1):
        members = rng.permutation(np.flatnonzero(patient_label == stratum))
        cuts = np.round(np.cumsum(ratios_arr)[:2] * len(members)).astype(int)
        for name, part in zip(SPLITS, np.split(members, cuts)):
            patient_split[part] = name
    return patient_split[inverse].astype(str)


def exclusion_counts(raw: RawCohort, split: np.ndarray) -> dict[str, dict[str, int]]:
    """``{split: {reason: samples}}`` of the samples a cohort rule excludes (``raw.exclusion``), per split."""
    counts: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    if raw.exclusion is None:
        return counts
    for name in SPLITS:
        reasons, n = np.unique(raw.exclusion[(split == name) & ~raw.kept], return_counts=True)
        counts[name] = {str(r): int(k) for r, k in zip(reasons, n)}
    return counts


def write_split_file(path: Path, raw: RawCohort, split: np.ndarray) -> None:
    """``id,patient,split`` of every sample (excluded ones too), readable back as ``split_file``."""
    lines = ["id,patient,split"] + [f"{i},{p},{s}" for i, p, s in zip(raw.sample_ids, raw.patient_ids, split)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_split_file(path: Path, cohort: RawCohort) -> np.ndarray:
    """[N] split of every sample of ``cohort`` from a CSV with columns ``id,patient,split`` (what eagrl writes
    next to its cache) or ``PATIENT_ID,split`` (TJH's published file). An id the cohort does not have, or a
    sample the file does not assign, is one clear error."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except Exception as err:
        raise EAGRLInputError(f"{path}: cannot be read as CSV ({err})") from err
    key = "id" if "id" in table.columns else "PATIENT_ID"
    for column in (key, "split"):
        if column not in table.columns:
            raise EAGRLInputError(f"{path}: missing required column {column!r} (expected columns id,patient,split or PATIENT_ID,split)")
    bad = sorted(set(table["split"].astype(str)) - {"train", "val", "test"})
    if bad:
        raise EAGRLInputError(f"{path}: column 'split' must hold train/val/test, found {bad}")
    ids = table[key].astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    mapping = dict(zip(ids, table["split"]))
    known = set(cohort.sample_ids.astype(str))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise EAGRLInputError(
            f"{path}: {len(unknown)} id(s) in column {key!r} are not in the {cohort.dataset} cohort, e.g. {unknown[0]!r}"
        )
    unassigned = [i for i in cohort.sample_ids.astype(str) if i not in mapping]
    if unassigned:
        raise EAGRLInputError(f"{path}: {len(unassigned)} cohort sample(s) have no split assigned")
    return np.array([mapping[i] for i in cohort.sample_ids.astype(str)])


# ---------------------------------------------------------------------------- normalise / impute
def train_statistics(raw: RawCohort, split: np.ndarray) -> NormStats:
    """Per-feature z-score mean/std (values strictly inside the train 5-95th percentiles) and median."""
    sample_of_row = np.repeat(np.arange(raw.num_samples), np.diff(raw.offsets))  # [R]
    train = raw.values[split[sample_of_row] == "train"].astype(np.float64)  # [R_train, F]
    n_features = train.shape[1]
    mean, std, median = np.zeros(n_features), np.ones(n_features), np.full(n_features, np.nan)
    for j, spec in enumerate(raw.features):
        column = train[:, j]
        column = column[~np.isnan(column)]
        if column.size == 0:
            continue
        median[j] = np.median(column)
        if spec.binary:
            continue
        low, high = np.percentile(column, [5, 95])
        inner = column[(column > low) & (column < high)]
        if inner.size < 2:
            inner = column
        mean[j] = inner.mean()
        sd = inner.std(ddof=1) if inner.size > 1 else 0.0
        std[j] = sd if np.isfinite(sd) and sd > 1e-12 else 1.0
    return NormStats(mean=mean, std=std, median=median)


def impute_forward_then_fill(values: np.ndarray, offsets: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Carry the last value forward within each sample, then fill leading gaps with ``fill``.

    values: [R, F] with NaN for missing; offsets: [N + 1]; fill: [F] (NaN in fill becomes 0).
    """
    out = values.copy()
    fill = np.nan_to_num(fill.astype(out.dtype), nan=0.0)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        block = out[start:stop]  # [T, F], a view
        for t in range(1, len(block)):
            gap = np.isnan(block[t])
            block[t, gap] = block[t - 1, gap]
        leading = np.isnan(block)
        block[leading] = np.broadcast_to(fill, block.shape)[leading]
    return out


def prepare(raw: RawCohort, split: np.ndarray, meta: dict[str, Any] | None = None, stats: NormStats | None = None) -> PreparedCohort:
    """Normalise and impute ``raw`` with the train statistics of ``split``, or with ``stats`` when given (an
    external cohort scored with ``split: all`` takes the model's training statistics, never its own)."""
    if stats is None:
        for name in SPLITS:
            if not (split == name).any():
                raise EAGRLInputError(f"the {name} split of dataset {raw.dataset!r} is empty: check split / split_ratios")
        stats = train_statistics(raw, split)
    normalised = ((raw.values - stats.mean) / stats.std).astype(np.float32)  # [R, F]
    fill = (stats.median - stats.mean) / stats.std  # [F], normalised train median
    imputed = impute_forward_then_fill(normalised, raw.offsets, fill)
    return PreparedCohort(raw=raw, split=split, stats=stats, normalised=imputed, missing=np.isnan(raw.values), meta=meta or {})


# ----------------------------------------------------------------------------------------- cache
def fingerprint(path: Path) -> str:
    """sha256 of a source file, or size+mtime for files over 512 MiB (hashing a 40 GB table costs minutes)."""
    stat = path.stat()
    if stat.st_size > _FULL_HASH_LIMIT:
        return f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"
    return "sha256=" + sha256_file(path)


def cache_key(dataset: str, options: dict[str, Any]) -> str:
    payload = json.dumps({"dataset": dataset, "options": options, "version": PREPROCESS_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _save(prepared: PreparedCohort, folder: Path, manifest: dict[str, Any]) -> None:
    raw = prepared.raw
    arrays = {
        "sample_ids": raw.sample_ids.astype(str),
        "patient_ids": raw.patient_ids.astype(str),
        "offsets": raw.offsets,
        "values": raw.values,
        "days": raw.days,
        "split": prepared.split.astype(str),
        "normalised": prepared.normalised,
        "missing": prepared.missing,
        "stat_mean": prepared.stats.mean,
        "stat_std": prepared.stats.std,
        "stat_median": prepared.stats.median,
        **{f"label_{task}": y for task, y in raw.labels.items()},
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "arrays.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    manifest = {
        **manifest,
        "arrays_sha256": sha256_file(folder / "arrays.npz"),
        "features": [asdict(f) for f in raw.features],
        "meta": prepared.meta,
    }
    write_json_atomic(folder / "manifest.json", manifest)


def _load(folder: Path, manifest: dict[str, Any]) -> PreparedCohort:
    with np.load(folder / "arrays.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    features = tuple(FeatureSpec(**f) for f in manifest["features"])
    raw = RawCohort(
        dataset=manifest["dataset"],
        features=features,
        sample_ids=arrays["sample_ids"],
        patient_ids=arrays["patient_ids"],
        offsets=arrays["offsets"],
        values=arrays["values"],
        days=arrays["days"],
        labels={k[len("label_"):]: v for k, v in arrays.items() if k.startswith("label_")},
    )
    stats = NormStats(arrays["stat_mean"], arrays["stat_std"], arrays["stat_median"])
    return PreparedCohort(raw, arrays["split"], stats, arrays["normalised"], arrays["missing"], manifest.get("meta", {}))


def load_or_build(
    dataset: str,
    options: dict[str, Any],
    sources: list[Path],
    build: Callable[[], PreparedCohort],
    cache_root: Path,
    rebuild: bool = False,
) -> tuple[PreparedCohort, bool]:
    """Return the cached cohort when its manifest matches, else build, cache and return it.

    Returns (cohort, built) where ``built`` says whether preprocessing ran.
    """
    if dataset not in DATASET_FEATURES:
        raise EAGRLInputError(f"unknown dataset {dataset!r}: expected one of {sorted(DATASET_FEATURES)}")
    for path in sources:
        if not path.is_file():
            raise EAGRLInputError(f"{dataset} source file {path} does not exist")
    folder = cache_root / "datasets" / dataset / cache_key(dataset, options)
    expected = {
        "dataset": dataset,
        "version": PREPROCESS_VERSION,
        "options": json.loads(json.dumps(options)),
        "sources": {path.name: fingerprint(path) for path in sources},
    }
    manifest_path = folder / "manifest.json"
    if not rebuild and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            same = all(manifest.get(k) == v for k, v in expected.items())
            if same and sha256_file(folder / "arrays.npz") == manifest.get("arrays_sha256"):
                return _load(folder, manifest), False
            log.info("preprocessing cache %s is stale or damaged; rebuilding", folder)
        except (OSError, ValueError, KeyError) as err:
            log.warning("preprocessing cache %s cannot be read (%s); rebuilding", folder, err)
    prepared = build()
    _save(prepared, folder, expected)
    return prepared, True


def cache_folder(cache_root: Path, dataset: str, options: dict[str, Any]) -> Path:
    return cache_root / "datasets" / dataset / cache_key(dataset, options)


__all__ = [
    "PREPROCESS_VERSION",
    "cache_folder",
    "exclusion_counts",
    "impute_forward_then_fill",
    "load_or_build",
    "prepare",
    "read_split_file",
    "stratified_patient_split",
    "train_statistics",
    "write_split_file",
]
