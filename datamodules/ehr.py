"""``EHRDataModule``: one LightningDataModule for TJH, MIMIC-IV and the synthetic cohort, chosen by config.

Preprocessing runs once in ``prepare_data`` and is cached (see ``eagrl.data.preprocess``); ``setup``
loads the cache. A batch is a dict of padded tensors (see ``eagrl.data.batch.collate_samples``); ``EHRDataset.text``
serialises a sample for the LLM.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import DataLoader, Subset, Dataset

from datamodules.sampling import BatchShard, make_loader, resumed_batches
from eagrl.data import meds, mimic_iv, synthetic, tjh
from eagrl.data.batch import collate_samples
from eagrl.data.cohort import SPLITS, NormStats, PreparedCohort, RawCohort
from eagrl.data.features import DATASET_TASKS, resolve_feature_names
from eagrl.data.preprocess import (
    PREPROCESS_VERSION,
    cache_folder,
    exclusion_counts,
    load_or_build,
    prepare,
    read_split_file,
    stratified_patient_split,
    write_split_file,
)
from eagrl.data.text import question_key, serialize_patient, system_prompt
from eagrl.errors import EAGRLInputError
from eagrl.paths import cache_dir, data_dir

log = logging.getLogger(__name__)

UNIT_RATIO = 10.0  # a cohort median this many times off the training median (either way) is warned about


def unit_warnings(raw: RawCohort, stats: NormStats) -> list[str]:
    """One line per non-binary feature whose median in ``raw`` is more than ``UNIT_RATIO`` times off (either way)
    the training median in ``stats``: the units may differ. Features either cohort never measured, or with a
    median of 0, are not compared."""
    lines = []
    for j, spec in enumerate(raw.features):
        column = raw.values[:, j].astype(np.float64)  # [R]
        column = column[~np.isnan(column)]
        trained = float(stats.median[j])
        if spec.binary or column.size == 0 or not np.isfinite(trained) or trained == 0:
            continue
        here = float(np.median(column))
        ratio = abs(here / trained)
        if here != 0 and (ratio > UNIT_RATIO or ratio < 1 / UNIT_RATIO):
            lines.append(
                f"data: feature {spec.name!r} has median {here:.4g} in this cohort and {trained:.4g} in the model's training "
                f"cohort ({ratio:.3g}x): check that its unit is {spec.unit or 'the same'}"
            )
    return lines


class EHRDataset(Dataset):
    """The samples of one split. Item: a dict of numpy arrays for one sample (see ``__getitem__``)."""

    def __init__(self, cohort: PreparedCohort, split: str, task: str, text_options: dict[str, Any] | None = None):
        self.cohort, self.split, self.task = cohort, split, task
        self.index = cohort.indices(split)  # [N_split] positions in the cohort
        self.n_demographic = sum(f.demographic for f in cohort.raw.features)
        self.text_options = text_options or {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(self.index[i])
        raw = self.cohort.raw
        rows = raw.rows(k)
        x = self.cohort.normalised[rows]  # [T, F]
        missing = self.cohort.missing[rows]  # [T, F] bool
        return {
            "id": str(raw.sample_ids[k]),
            "index": i,
            "split": self.split,
            "x": x,
            "missing": missing,
            "days": raw.days[rows],  # [T]
            "demographics": x[0, : self.n_demographic],  # [D], normalised
            "label": np.float32(raw.labels[self.task][k]),
            "raw": raw.values[rows],  # [T, F], un-normalised, NaN = not measured
        }

    @property
    def ids(self) -> list[str]:
        """The split's sample ids, in order (without building the samples)."""
        return [str(i) for i in self.cohort.raw.sample_ids[self.index]]

    def sex_age(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Sex (1 male, 0 female) and Age (years) of samples ``indices`` of this split, [N] each, NaN where the
        cohort has no such feature: the subgroups of ``eagrl.evaluation.subgroup_metrics``. Kept in memory only."""
        names = [f.name for f in self.cohort.raw.features]
        raw = self.cohort.raw
        first = np.array([raw.rows(int(self.index[int(i)])).start for i in indices], dtype=np.int64)  # [N]
        pick = lambda name: raw.values[first, names.index(name)].astype(np.float64) if name in names else np.full(len(first), np.nan)  # noqa: E731
        return pick("Sex"), pick("Age")

    @property
    def labels(self) -> np.ndarray:
        return self.cohort.raw.labels[self.task][self.index]

    def visits(self, i: int) -> int:
        """Number of visits (days) of sample ``i``."""
        rows = self.cohort.raw.rows(int(self.index[i]))
        return rows.stop - rows.start

    def text(self, i: int, **overrides: Any) -> str:
        """The LLM serialisation of sample ``i`` (options from the datamodule, overridable here)."""
        item = self[i]
        options = {**self.text_options, **overrides}
        return serialize_patient(item["raw"], item["days"], self.cohort.raw.features, sample_id=item["id"], **options)


class EHRDataModule(L.LightningDataModule):
    """TJH or MIMIC-IV, preprocessed once and cached; train/val/test loaders of padded batches.

    Args:
        dataset: ``tjh``, ``mimic_iv``, ``meds`` (ICU stays of a MEDS events table, with MIMIC-IV's variables:
            ``eagrl.data.meds``) or ``synthetic`` (generated patients whose outcome follows a known rule over three
            variables, the mechanism check: ``eagrl.data.synthetic``).
        task: ``mortality`` (all) or ``readmission`` (MIMIC-IV).
        data_dir: the shared data folder (default: ``$EAGRL_DATA_DIR`` or ``../shared/data``).
        mimic_dir: the MIMIC-IV folder (with ``hosp/`` and ``icu/``), relative to ``data_dir`` or absolute.
            Point it at a full MIMIC-IV v2.2/v3.1 folder to use the full database.
        cache_dir: cache root (default: ``$EAGRL_CACHE_DIR`` or ``~/.cache/eagrl``).
        meds_file: ``dataset: meds``: the MEDS events parquet (``subject_id``, ``time``, ``code`` and a value column),
            relative to ``data_dir`` or absolute. Default: the MEDS copy of the MIMIC-IV demo in the shared data.
        meds_value_column: the events table's numeric value column (MEDS: ``numeric_value``; the shared copy: ``value``).
        meds_mapping: a CSV ``code,feature,conversion`` mapping MEDS codes to the MIMIC-IV variables; None: the
            shipped mapping of MIMIC-IV's chartevents codes (``LAB//<itemid>//<unit>``).
        meds_labels: a MEDS label file (``subject_id``, ``prediction_time``, ``boolean_value``) labelling the task;
            None: the MIMIC-IV stay rules over the death, admission and ICU codes.
        cohort_file: TJH only: a cohort file in the TJH spreadsheet schema (xlsx, or csv by its suffix), read instead
            of the shipped spreadsheet: another hospital's patients. ``PATIENT_ID``, ``RE_DATE`` and ``outcome`` are
            needed; a lacking feature column stops the run naming it, unless ``allow_missing_features``.
        allow_missing_features: a cohort that lacks some of the model's features is scored with them as never
            measured (ConCare: imputed with the training statistics; the LLM: left out of the text). A warning names
            them once with the fraction of the model's features present; ``metrics.json`` records both
            (``data/absent_features``, ``data/features_present``).
        date_format: the strftime pattern of the cohort file's dates (e.g. ``"%d.%m.%Y %H:%M"``); None: inferred.
        split: ``published`` (TJH's ClinicRealm split), ``stratified`` (seeded, patient-level, stratified on
            mortality, so both MIMIC-IV tasks share it), ``file`` (``split_file``) or ``all`` (every patient is a
            test patient: external validation of a checkpoint; normalisation and imputation come from the
            checkpoint's training cohort, never from this one). Default: published for the shipped TJH file,
            stratified otherwise. Every split is made before the cohort's exclusions and written to
            ``split.csv`` in the cache folder (``summary`` prints where).
        split_file: with ``split: file``, a CSV with columns ``id,patient,split`` (such a ``split.csv``) or
            ``PATIENT_ID,split``, naming every sample of the cohort before exclusions.
        synthetic_patients: ``dataset: synthetic``: how many patients to generate.
        synthetic_seed: ``dataset: synthetic``: the generator's seed (the split has its own, ``split_seed``).
        split_ratios: train/val/test fractions of patients for the stratified split.
        split_seed: seed of the stratified split.
        observation_hours: MIMIC-IV mortality: read only the first N hours after ICU ``intime``; stays that end
            (death or ICU discharge) before then are excluded. None: the whole stay (the group's protocol).
        observation_days: TJH: read only the first N days from the first record (day 1 .. N); patients whose
            stay ends before then are excluded. None: the whole stay.
        readmission_level: MIMIC-IV readmission: ``icu`` (the group's definition: next ICU stay within 30
            days of ``outtime``, or death from ``intime`` to 30 days after ``outtime``) or ``hospital`` (next
            admission within 30 days of ``dischtime``; stays of in-hospital deaths excluded).
        batch_size: samples per batch.
        eval_batch_size: samples per test batch (the LLMs answer a test batch in one ``generate`` call); None:
            ``batch_size``. RL trains on small batches (patients per rollout) but answers the test split faster in
            larger ones; the answers do not depend on it (greedy decoding, each prompt prefilled alone).
        num_workers: DataLoader worker processes of the evaluation loaders (val, test, predict). The shuffled train
            loader reads its order in the main process: its epoch and a resumed fit's progress are restored after the
            trainer first starts the loader, and worker processes would read them before (``datamodules.sampling``).
        text_style: the LLM's patient text: ``paper`` (every feature's value at every visit, the paper's format)
            or ``compact`` (per measured variable its last value with an H/L flag, min-max and trend; variables
            normal throughout grouped on one line; about a third of the tokens on TJH). See ``eagrl.data.text``.
        max_visits: show only the last N visits in the LLM text (None: all).
        shuffle_fraction: fraction of feature lines whose order is permuted in the LLM text (0, 0.2, ..., 1).
            Tensor inputs are never permuted: ConCare has one GRU per feature and is order-invariant by
            construction (permuting its columns would feed one feature's values to another's GRU).
        shuffle_seed: seed of that permutation.
        chunk_size: rows of MIMIC-IV chartevents read at a time (memory follows this, not the table size).
        max_steps: MIMIC-IV days kept per stay (earlier days collapse into the first kept one).
        rebuild_cache: ignore a valid cache and preprocess again.
        progress: show progress bars while preprocessing.
        train_patients: train on a seeded subset of this many train patients, half of each outcome where
            the split has enough (CPU demos: the same few patients every epoch, so their reward can be
            followed); None: every train patient.
        eval_patients: ``test`` runs over a seeded subset of this many test patients, half of each outcome
            (CPU evaluations of the LLM methods: every method answers the same patients); None: all.
        features: train and evaluate on these features only (the dataset's names or the answer parser's aliases,
            e.g. ``[LDH, hs-CRP, lymphocyte %]`` on TJH); Sex and Age are always kept (ConCare's demographic
            input). ConCare, the LLM text and the expert export follow it. None: every feature.
        predict_splits: the splits ``predict`` runs over (one dataloader each), e.g. ``[train, val]`` for
            stage 1's distillation.
    """

    def __init__(
        self,
        dataset: Literal["tjh", "mimic_iv", "meds", "synthetic"] = "tjh",
        task: str = "mortality",
        data_dir: Optional[str] = None,
        mimic_dir: str = "mimic-iv-demo",
        meds_file: str = "mimic-iv-demo/meds_fallback/mimic_iv_demo_meds_events.parquet",
        meds_value_column: str = "numeric_value",
        meds_mapping: Optional[str] = None,
        meds_labels: Optional[str] = None,
        cohort_file: Optional[str] = None,
        allow_missing_features: bool = False,
        date_format: Optional[str] = None,
        cache_dir: Optional[str] = None,
        split: Optional[Literal["published", "stratified", "file", "all"]] = None,
        split_file: Optional[str] = None,
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 42,
        synthetic_patients: PositiveInt = 500,
        synthetic_seed: int = 0,
        batch_size: PositiveInt = 64,
        eval_batch_size: Optional[PositiveInt] = None,
        num_workers: NonNegativeInt = 0,
        text_style: Literal["paper", "compact"] = "paper",
        max_visits: Optional[PositiveInt] = None,
        shuffle_fraction: float = 0.0,
        shuffle_seed: int = 0,
        chunk_size: PositiveInt = 1_000_000,
        max_steps: PositiveInt = 8,
        observation_hours: Optional[PositiveFloat] = None,
        observation_days: Optional[PositiveInt] = None,
        readmission_level: Literal["icu", "hospital"] = "icu",
        rebuild_cache: bool = False,
        progress: bool = True,
        predict_splits: list[Literal["train", "val", "test"]] = ["test"],  # noqa: B006 - jsonargparse needs a value
        train_patients: Optional[PositiveInt] = None,
        eval_patients: Optional[PositiveInt] = None,
        features: Optional[list[str]] = None,
    ):
        super().__init__()
        if dataset not in DATASET_TASKS:
            raise EAGRLInputError(f"data.dataset: unknown dataset {dataset!r}, expected one of {sorted(DATASET_TASKS)}")
        if task not in DATASET_TASKS[dataset]:
            raise EAGRLInputError(
                f"data.task: unknown task {task!r} for dataset {dataset!r}, expected one of {list(DATASET_TASKS[dataset])}"
            )
        self.features = None if features is None else resolve_feature_names(list(features), dataset)
        for key, value in {"cohort_file": cohort_file, "date_format": date_format}.items():
            if value is not None and dataset != "tjh":
                hint = "; for a MIMIC-IV folder use data.mimic_dir" if dataset == "mimic_iv" else ""
                raise EAGRLInputError(f"data.{key} applies to a cohort file in the TJH schema (dataset tjh), not {dataset!r}{hint}")
        split = split or ("published" if dataset == "tjh" and cohort_file is None else "stratified")
        if split == "published" and dataset != "tjh":
            raise EAGRLInputError(f"data.split: 'published' exists only for tjh; use 'stratified' for {dataset}")
        if split == "published" and cohort_file is not None:
            raise EAGRLInputError("data.split: 'published' names the shipped TJH file's patients; a data.cohort_file takes 'all', 'stratified' or 'file'")
        if (split == "file") != (split_file is not None):
            raise EAGRLInputError("data.split_file: give a split file exactly when data.split is 'file'")
        window = {"observation_hours": observation_hours, "observation_days": observation_days}
        own = "observation_hours" if dataset in ("mimic_iv", "meds") else "observation_days"
        for key, value in window.items():
            if value is not None and dataset == "synthetic":
                raise EAGRLInputError(f"data.{key}: the synthetic cohort has no observation window (its rule reads the last visit)")
            if value is not None and key != own:
                raise EAGRLInputError(f"data.{key} applies to {'mimic_iv and meds' if key == 'observation_hours' else 'tjh'}; for {dataset} use data.{own}")
            if value is not None and task == "readmission":
                raise EAGRLInputError(
                    f"data.{key}: readmission is predicted at discharge from the whole stay; an observation window applies to mortality only"
                )
        if readmission_level != "icu" and task != "readmission":
            raise EAGRLInputError(f"data.readmission_level applies to task readmission, not {task!r}")
        if not 0.0 <= shuffle_fraction <= 1.0:
            raise EAGRLInputError(f"data.shuffle_fraction must be within [0, 1], got {shuffle_fraction}")
        if not predict_splits:
            raise EAGRLInputError("data.predict_splits must name at least one of train, val, test")
        self.save_hyperparameters()
        self.dataset, self.task, self.split = dataset, task, split
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cohort: PreparedCohort | None = None
        self.datasets: dict[str, EHRDataset] = {}
        self.text_options = {"style": text_style, "max_visits": max_visits, "shuffle_fraction": shuffle_fraction, "shuffle_seed": shuffle_seed}
        self.training_statistics: dict[str, Any] | None = None  # split all: the checkpoint's (load_state_dict)
        self.input_report: dict[str, Any] = {}  # what metrics.json records about the input (absent features, units)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------ preprocessing
    def _source_dir(self) -> Path:
        if self.dataset == "synthetic":  # generated: nothing is read
            return Path("generated")
        if self.hparams.cohort_file is not None:
            path = Path(self.hparams.cohort_file).expanduser()
            if not path.is_file():
                raise EAGRLInputError(f"data.cohort_file: {path} does not exist (expected a TJH-schema xlsx or csv)")
            return path.resolve()
        root = data_dir(self.hparams.data_dir)
        if self.dataset == "tjh":
            return root
        if self.dataset == "meds":
            return self._meds_path(self.hparams.meds_file, root, "data.meds_file", "a MEDS events parquet")
        folder = Path(self.hparams.mimic_dir).expanduser()
        folder = folder if folder.is_absolute() else root / folder
        if not folder.is_dir():
            raise EAGRLInputError(f"data.mimic_dir: MIMIC-IV folder {folder} does not exist (expected hosp/ and icu/ inside)")
        return folder

    @staticmethod
    def _meds_path(value: str, root: Path, key: str, what: str) -> Path:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise EAGRLInputError(f"{key}: {path} does not exist (expected {what})")
        return path.resolve()

    def _meds_extra(self) -> list[Path]:
        """The MEDS mapping and label files (absolute), when given."""
        root, hp = data_dir(self.hparams.data_dir), self.hparams
        extra = []
        if hp.meds_mapping is not None:
            extra.append(self._meds_path(hp.meds_mapping, Path.cwd(), "data.meds_mapping", "a CSV with columns code,feature,conversion"))
        if hp.meds_labels is not None:
            extra.append(self._meds_path(hp.meds_labels, root, "data.meds_labels", "a MEDS label file"))
        return extra

    def _split_file(self) -> Path | None:
        if self.hparams.split_file is None:
            return None
        path = Path(self.hparams.split_file).expanduser()
        if not path.is_file():
            raise EAGRLInputError(f"data.split_file: {path} does not exist (expected a CSV with columns id,patient,split)")
        return path.resolve()

    def _written_split_file(self) -> str:
        """Where this cohort's ``split.csv`` lies (in its cache folder)."""
        source = self._source_dir()
        path = cache_folder(cache_dir(self.hparams.cache_dir), self.dataset, self._options(source)) / "split.csv"
        return str(path) if path.is_file() else "not written (rebuild the cache)"

    def _window(self) -> dict[str, Any]:
        """The observation window of the cohort (empty: the whole stay)."""
        hp = self.hparams
        if hp.observation_hours is not None:
            return {"observation_hours": float(hp.observation_hours), "from": "ICU intime"}
        if hp.observation_days is not None:
            return {"observation_days": int(hp.observation_days), "from": "the first record (day 1)"}
        return {}

    def _options(self, source: Path) -> dict[str, Any]:
        source_dir = "generated" if self.dataset == "synthetic" else str(source.resolve())
        options: dict[str, Any] = {"source_dir": source_dir, "split": self.split, **self._window()}
        if self.dataset == "synthetic":
            options.update(synthetic_patients=self.hparams.synthetic_patients, synthetic_seed=self.hparams.synthetic_seed)
        if self.split == "stratified":
            options.update(split_ratios=list(self.hparams.split_ratios), split_seed=self.hparams.split_seed)
        if self.split == "file":
            options.update(split_file=str(self._split_file()))
        if self.features is not None:
            options.update(features=self.features)
        if self.hparams.cohort_file is not None:
            options.update(allow_missing_features=self.hparams.allow_missing_features, date_format=self.hparams.date_format)
        if self.dataset == "meds":
            options.update(value_column=self.hparams.meds_value_column, extra=[str(p) for p in self._meds_extra()],
                           labels_for=self.task if self.hparams.meds_labels else None)  # fmt: skip
        if self.dataset in ("mimic_iv", "meds"):
            options.update(max_steps=self.hparams.max_steps)  # chunk_size changes memory, not the result
            if self.task == "readmission":
                options.update(readmission_level=self.hparams.readmission_level)
        return options

    def _build(self, source: Path, folder: Path) -> PreparedCohort:
        """Read the whole cohort, split it (before exclusions), write ``split.csv``, drop the excluded samples."""
        hp = self.hparams
        if self.dataset == "tjh" and hp.cohort_file is not None:
            model_features = None if self.features is None else ["Sex", "Age", *self.features]
            raw = tjh.load_tjh(source.parent, hp.observation_days, source, model_features, hp.allow_missing_features, hp.date_format)
        elif self.dataset == "tjh":
            raw = tjh.load_tjh(source, hp.observation_days)
        elif self.dataset == "synthetic":
            raw = synthetic.load_synthetic(hp.synthetic_patients, hp.synthetic_seed)
        elif self.dataset == "meds":
            level = hp.readmission_level if self.task == "readmission" else "icu"
            mapping = self._meds_path(hp.meds_mapping, Path.cwd(), "data.meds_mapping", "a CSV") if hp.meds_mapping else None
            labels = self._meds_path(hp.meds_labels, data_dir(hp.data_dir), "data.meds_labels", "a MEDS label file") if hp.meds_labels else None
            raw = meds.load_meds(source, hp.meds_value_column, mapping, labels, self.task, hp.chunk_size, hp.max_steps, hp.progress, hp.observation_hours, level)
        else:
            level = hp.readmission_level if self.task == "readmission" else "icu"
            raw = mimic_iv.load_mimic_iv(source, hp.chunk_size, hp.max_steps, hp.progress, hp.observation_hours, level)
        if raw.num_samples == 0:
            raise EAGRLInputError(f"{self.dataset}: the cohort is empty after filtering")
        if self.features is not None:
            raw = raw.select_features(self.features)
        if self.split == "all":
            split = np.full(raw.num_samples, "test")
        elif self.split == "published":
            split = tjh.published_split(source, raw)
        elif self.split == "file":
            split = read_split_file(self._split_file(), raw)
        else:  # on mortality, whatever the task: one split for both MIMIC-IV tasks
            split = stratified_patient_split(raw.patient_ids, raw.labels["mortality"], tuple(hp.split_ratios), hp.split_seed)
        write_split_file(folder / "split.csv", raw, split)
        kept = raw.kept
        meta = {
            "preprocess_version": PREPROCESS_VERSION,
            "window": self._window(),
            "before_exclusions": {name: int((split == name).sum()) for name in SPLITS},
            "exclusions": exclusion_counts(raw, split),
            "notes": raw.notes,
        }
        if not kept.any():
            raise EAGRLInputError(f"{self.dataset}: every sample is excluded by the cohort rules ({meta['exclusions']})")
        if self.split == "all":  # normalised later with the checkpoint's training statistics (load_state_dict)
            meta["statistics"] = "the model's training cohort (from the checkpoint)"
            return prepare(raw.subset(kept), split[kept], meta=meta, stats=NormStats.none(len(raw.features)))
        return prepare(raw.subset(kept), split[kept], meta=meta)

    def load_cohort(self) -> PreparedCohort:
        """Load the cached cohort, preprocessing first when the cache is missing or stale."""
        source = self._source_dir()
        if self.hparams.cohort_file is not None:
            sources = [source]
        else:
            sources = {"tjh": tjh.source_files, "mimic_iv": mimic_iv.source_files, "synthetic": lambda _: [], "meds": lambda p: [p, *self._meds_extra()]}[self.dataset](source)
        sources += [p for p in [self._split_file()] if p is not None]
        options, root = self._options(source), cache_dir(self.hparams.cache_dir)
        folder = cache_folder(root, self.dataset, options)
        cohort, built = load_or_build(
            self.dataset, options, sources, lambda: self._build(source, folder), root, rebuild=self.hparams.rebuild_cache
        )
        log.info("%s cohort %s", self.dataset, "preprocessed and cached" if built else "loaded from cache")
        return cohort

    def prepare_data(self) -> None:
        self.cohort = self.load_cohort()

    def setup(self, stage: str | None = None) -> None:
        if self.split == "all" and stage == "fit":
            raise EAGRLInputError("data.split all makes every patient a test patient: use it with `test` and --ckpt_path, not `fit`")
        if self.cohort is None:
            self.cohort = self.load_cohort()
        self._report_absent_features()
        if self.split == "all" and self.training_statistics is not None and self.cohort.meta.get("statistics_applied") is None:
            self._apply_training_statistics()
        for split in SPLITS:
            self.datasets[split] = EHRDataset(self.cohort, split, self.task, self.text_options)

    # ------------------------------------------------------------------------- external cohorts
    def _report_absent_features(self) -> None:
        """Features of the model the cohort file lacks: left out of the LLM's text, warned about once, recorded."""
        absent = list(self.cohort.meta.get("notes", {}).get("absent_features", []))  # meta: kept in the cache too
        if not absent:
            return
        dynamic = {f.name for f in self.cohort.raw.features if not f.demographic}
        self.text_options["omit"] = [name for name in absent if name in dynamic]  # Sex/Age: "unknown" in the header
        n_model = len(self.cohort.raw.features)
        present = (n_model - len(absent)) / n_model
        self.input_report.update({"data/absent_features": absent, "data/features_present": present})
        if "absent" not in self._warned:
            self._warned.add("absent")
            rank_zero_warn(
                f"data: the cohort lacks {len(absent)} of the model's {n_model} features ({', '.join(absent)}); they are "
                f"scored as never measured; {present:.0%} of the model's features are present"
            )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the training cohort's feature names and normalisation/imputation
        statistics, so that ``split: all`` scores an external cohort with them."""
        if self.training_statistics is not None and self.split == "all":
            return {"training_statistics": self.training_statistics}
        if self.cohort is None or self.split == "all":
            return {}
        return {"training_statistics": {"dataset": self.dataset, "features": self.cohort.raw.feature_names, **self.cohort.stats.as_lists()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.training_statistics = state_dict.get("training_statistics")
        if self.split == "all" and self.cohort is not None and self.training_statistics is not None:
            self._apply_training_statistics()
            for split in SPLITS:
                self.datasets[split] = EHRDataset(self.cohort, split, self.task, self.text_options)

    def _apply_training_statistics(self) -> None:
        """Normalise and impute the (``split: all``) cohort with the checkpoint's training statistics; warn about
        a feature whose median is more than 10x off the training cohort's (other units?)."""
        saved, raw = self.training_statistics, self.cohort.raw
        if list(saved["features"]) != raw.feature_names:
            extra = sorted(set(raw.feature_names) - set(saved["features"]))
            lacking = sorted(set(saved["features"]) - set(raw.feature_names))
            raise EAGRLInputError(
                f"data.split all: the checkpoint was trained on {len(saved['features'])} features, this cohort has "
                f"{len(raw.feature_names)} (not in the checkpoint: {extra[:5]}; not in this cohort: {lacking[:5]}): give the "
                "training run's data.features"
            )
        stats = NormStats(*(np.asarray(saved[k], dtype=np.float64) for k in ("mean", "std", "median")))
        self.cohort = prepare(raw, self.cohort.split, meta={**self.cohort.meta, "statistics_applied": True}, stats=stats)
        warnings_ = unit_warnings(raw, stats)
        if warnings_:
            self.input_report["data/unit_warnings"] = warnings_
        for line in warnings_:
            if line not in self._warned:
                self._warned.add(line)
                rank_zero_warn(line)

    def require_training_statistics(self) -> None:
        """Under ``split: all``, stop with one line unless the checkpoint gave the training statistics (models
        that read normalised inputs call this when testing starts)."""
        if self.split == "all" and self.training_statistics is None:
            raise EAGRLInputError(
                "data.split all: the normalisation and imputation of an external cohort come from the model's training "
                "cohort, and this checkpoint does not hold them (saved before eagrl kept them, or no --ckpt_path): "
                "refit the model, or test on the cohort's own split"
            )

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool, size: Optional[int] = None, batch_size: Optional[int] = None) -> DataLoader:
        """The loader of ``split``; with ``size``, of its balanced seeded subset of that many patients."""
        if split not in self.datasets:
            self.setup()
        data = self.datasets[split] if size is None else Subset(self.datasets[split], self.subset(split, size))
        workers = 0 if shuffle else self.num_workers  # the train order is read after a resume's restore (see num_workers)
        return make_loader(data, batch_size or self.batch_size, shuffle, collate_samples, workers, self._current_epoch, self._resumed)

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _resumed(self) -> int:
        return resumed_batches(self.trainer)

    def subset(self, split: str, size: int) -> list[int]:
        """Positions in ``split`` of a seeded subset of ``size`` patients (seed ``split_seed``), half of
        each outcome where the split has enough (the rest filled from the other outcome)."""
        if split not in self.datasets:
            self.setup()
        labels = self.datasets[split].labels
        rng = np.random.default_rng(self.hparams.split_seed)
        positive = rng.permutation(np.flatnonzero(labels == 1)).tolist()
        negative = rng.permutation(np.flatnonzero(labels != 1)).tolist()
        wanted = min(size, len(labels))
        take = min(len(positive), wanted // 2)
        chosen = positive[:take] + negative[: wanted - take]
        chosen += positive[take : take + wanted - len(chosen)]  # too few negatives: fill with positives
        return sorted(chosen)

    def train_subset(self) -> list[int]:
        """Positions in the train split of the ``train_patients`` subset."""
        return self.subset("train", self.hparams.train_patients)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, size=self.hparams.train_patients)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, size=self.hparams.eval_patients, batch_size=self.hparams.eval_batch_size)

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and not trainer._accelerator_connector.use_distributed_sampler:
            loaders = [self._batch_shard(split, trainer.global_rank, trainer.world_size) for split in self.hparams.predict_splits]
        else:
            loaders = [self._loader(split, shuffle=False) for split in self.hparams.predict_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def _batch_shard(self, split: str, rank: int, world: int) -> DataLoader:
        """This rank's whole batches of ``split`` (``use_distributed_sampler: false``; see ``BatchShard``)."""
        if split not in self.datasets:
            self.setup()
        data = self.datasets[split]
        sampler = BatchShard(len(data), self.batch_size, rank, world)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_samples)

    # ------------------------------------------------------------------------------------- extras
    @property
    def feature_names(self) -> list[str]:
        return (self.cohort or self.load_cohort()).raw.feature_names

    @property
    def system_prompt(self) -> str:
        return system_prompt(self.dataset, self.question)

    @property
    def question(self) -> str:
        """The key of the question the LLM is asked (``eagrl.data.text.TASK_QUESTIONS``)."""
        return question_key(self.task, self.hparams.readmission_level)

    def summary(self) -> dict[str, Any]:
        """Cohort sizes per split after the cohort rules, the exclusions by cause, the observation window and
        what the reader changed: what ``python -m eagrl summary`` prints."""
        cohort = self.cohort or self.load_cohort()
        raw, labels, meta = cohort.raw, cohort.raw.labels[self.task], cohort.meta
        exclusions = meta.get("exclusions", {})
        splits = {}
        for split in SPLITS:
            members = cohort.split == split
            splits[split] = {
                "patients": int(len(np.unique(raw.patient_ids[members]))),
                "samples": int(members.sum()),
                "positives": int(labels[members].sum()),
                "before_exclusions": meta.get("before_exclusions", {}).get(split),
                "excluded": exclusions.get(split, {}),
            }
        by_cause = sum((Counter(per_split) for per_split in exclusions.values()), Counter())
        out = {
            "dataset": self.dataset,
            "task": self.task,
            "observation_window": meta.get("window") or "the whole stay",
            "features": len(raw.features),
            "feature_names": raw.feature_names,
            "splits": splits,
            "excluded_by_cause": dict(by_cause),
            **meta.get("notes", {}),
            "split_file": self._written_split_file(),
        }
        if self.dataset in ("mimic_iv", "meds") and self.task == "readmission":
            out["readmission_level"] = self.hparams.readmission_level
        return out

    def prompt_tokens(self, tokenizer, prompt_style: str = "decomposition") -> dict[str, Any]:
        """Tokens per chat-templated prompt of every split, in this datamodule's text style: whether a cohort fits
        a model's context (``summary --tokenizer``). Counts only: no text leaves this method."""
        from eagrl.llm.prompts import build_prompt

        if not self.datasets:
            self.setup()
        question = question_key(self.task, self.hparams.readmission_level)
        per_split = {}
        for split, data in self.datasets.items():
            lengths = [
                len(tokenizer(build_prompt(tokenizer, data.text(i), self.dataset, question, prompt_style), add_special_tokens=False)["input_ids"])
                for i in range(len(data))
            ]
            per_split[split] = (
                {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)), "max": int(max(lengths))}
                if lengths
                else None
            )
        return {"text_style": self.text_options["style"], "prompt_style": prompt_style, "splits": per_split}
