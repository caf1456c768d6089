"""``EHRDataModule``: one LightningDataModule for TJH, MIMIC-IV and the synthetic cohort, chosen by config.

Preprocessing runs once in ``prepare_data`` and is cached (see ``eagrl.data.preprocess``); ``setup``
loads the cache. A batch is a dict of padded tensors (see ``collate_samples``); ``EHRDataset.text``
serialises a sample for the LLM.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch.utils.data import DataLoader, Subset, Dataset

from datamodules.sampling import BatchShard, make_loader
from eagrl.data import mimic_iv, synthetic, tjh
from eagrl.data.cohort import SPLITS, PreparedCohort
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


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of samples to the longest one (right padding).

    Returns x [B, T, F] float32 (0 in padding), missing [B, T, F] bool (True in padding),
    mask [B, T] bool (True on real days), lengths [B] int64, days [B, T] int64,
    demographics [B, D] float32, label [B] float32, raw [B, T, F] float32 (NaN in padding), id list[str],
    index [B] int64 (positions in the split's dataset, for ``EHRDataset.text``).
    """
    batch, longest = len(items), max(len(item["x"]) for item in items)
    n_features = items[0]["x"].shape[1]
    x = torch.zeros(batch, longest, n_features)
    missing = torch.ones(batch, longest, n_features, dtype=torch.bool)
    raw = torch.full((batch, longest, n_features), float("nan"))
    days = torch.zeros(batch, longest, dtype=torch.long)
    lengths = torch.tensor([len(item["x"]) for item in items])
    for b, item in enumerate(items):
        t = len(item["x"])
        x[b, :t] = torch.from_numpy(item["x"])
        missing[b, :t] = torch.from_numpy(item["missing"])
        raw[b, :t] = torch.from_numpy(item["raw"])
        days[b, :t] = torch.from_numpy(item["days"].astype(np.int64))
    return {
        "id": [item["id"] for item in items],
        "index": torch.tensor([item.get("index", -1) for item in items]),
        "split": [item.get("split", "") for item in items],
        "x": x,
        "missing": missing,
        "mask": torch.arange(longest)[None, :] < lengths[:, None],
        "lengths": lengths,
        "days": days,
        "demographics": torch.from_numpy(np.stack([item["demographics"] for item in items])),
        "label": torch.tensor([item["label"] for item in items]),
        "raw": raw,
    }


class EHRDataModule(L.LightningDataModule):
    """TJH or MIMIC-IV, preprocessed once and cached; train/val/test loaders of padded batches.

    Args:
        dataset: ``tjh``, ``mimic_iv`` or ``synthetic`` (generated patients whose outcome follows a known rule over
            three variables, the mechanism check: ``eagrl.data.synthetic``).
        task: ``mortality`` (all) or ``readmission`` (MIMIC-IV).
        data_dir: the shared data folder (default: ``$EAGRL_DATA_DIR`` or ``../shared/data``).
        mimic_dir: the MIMIC-IV folder (with ``hosp/`` and ``icu/``), relative to ``data_dir`` or absolute.
            Point it at a full MIMIC-IV v2.2/v3.1 folder to use the full database.
        cache_dir: cache root (default: ``$EAGRL_CACHE_DIR`` or ``~/.cache/eagrl``).
        split: ``published`` (TJH's ClinicRealm split), ``stratified`` (seeded, patient-level, stratified on
            mortality, so both MIMIC-IV tasks share it) or ``file`` (``split_file``). Default: published for
            TJH, stratified for MIMIC-IV. Every split is made before the cohort's exclusions and written to
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
        num_workers: DataLoader worker processes.
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
        dataset: Literal["tjh", "mimic_iv", "synthetic"] = "tjh",
        task: str = "mortality",
        data_dir: Optional[str] = None,
        mimic_dir: str = "mimic-iv-demo",
        cache_dir: Optional[str] = None,
        split: Optional[Literal["published", "stratified", "file"]] = None,
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
        split = split or ("published" if dataset == "tjh" else "stratified")
        if split == "published" and dataset != "tjh":
            raise EAGRLInputError(f"data.split: 'published' exists only for tjh; use 'stratified' for {dataset}")
        if (split == "file") != (split_file is not None):
            raise EAGRLInputError("data.split_file: give a split file exactly when data.split is 'file'")
        window = {"observation_hours": observation_hours, "observation_days": observation_days}
        own = "observation_hours" if dataset == "mimic_iv" else "observation_days"
        for key, value in window.items():
            if value is not None and dataset == "synthetic":
                raise EAGRLInputError(f"data.{key}: the synthetic cohort has no observation window (its rule reads the last visit)")
            if value is not None and key != own:
                raise EAGRLInputError(f"data.{key} applies to {'mimic_iv' if key == 'observation_hours' else 'tjh'}; for {dataset} use data.{own}")
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

    # ------------------------------------------------------------------------------ preprocessing
    def _source_dir(self) -> Path:
        if self.dataset == "synthetic":  # generated: nothing is read
            return Path("generated")
        root = data_dir(self.hparams.data_dir)
        if self.dataset == "tjh":
            return root
        folder = Path(self.hparams.mimic_dir).expanduser()
        folder = folder if folder.is_absolute() else root / folder
        if not folder.is_dir():
            raise EAGRLInputError(f"data.mimic_dir: MIMIC-IV folder {folder} does not exist (expected hosp/ and icu/ inside)")
        return folder

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
        if self.dataset == "mimic_iv":
            options.update(max_steps=self.hparams.max_steps)  # chunk_size changes memory, not the result
            if self.task == "readmission":
                options.update(readmission_level=self.hparams.readmission_level)
        return options

    def _build(self, source: Path, folder: Path) -> PreparedCohort:
        """Read the whole cohort, split it (before exclusions), write ``split.csv``, drop the excluded samples."""
        hp = self.hparams
        if self.dataset == "tjh":
            raw = tjh.load_tjh(source, hp.observation_days)
        elif self.dataset == "synthetic":
            raw = synthetic.load_synthetic(hp.synthetic_patients, hp.synthetic_seed)
        else:
            level = hp.readmission_level if self.task == "readmission" else "icu"
            raw = mimic_iv.load_mimic_iv(source, hp.chunk_size, hp.max_steps, hp.progress, hp.observation_hours, level)
        if raw.num_samples == 0:
            raise EAGRLInputError(f"{self.dataset}: the cohort is empty after filtering")
        if self.features is not None:
            raw = raw.select_features(self.features)
        if self.split == "published":
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
        return prepare(raw.subset(kept), split[kept], meta=meta)

    def load_cohort(self) -> PreparedCohort:
        """Load the cached cohort, preprocessing first when the cache is missing or stale."""
        source = self._source_dir()
        sources = {"tjh": tjh.source_files, "mimic_iv": mimic_iv.source_files, "synthetic": lambda _: []}[self.dataset](source)
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
        if self.cohort is None:
            self.cohort = self.load_cohort()
        for split in SPLITS:
            self.datasets[split] = EHRDataset(self.cohort, split, self.task, self.text_options)

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool, size: Optional[int] = None, batch_size: Optional[int] = None) -> DataLoader:
        """The loader of ``split``; with ``size``, of its balanced seeded subset of that many patients."""
        if split not in self.datasets:
            self.setup()
        data = self.datasets[split] if size is None else Subset(self.datasets[split], self.subset(split, size))
        return make_loader(data, batch_size or self.batch_size, shuffle, collate_samples, self.num_workers, self._current_epoch)

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

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
        if self.dataset == "mimic_iv" and self.task == "readmission":
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
