"""The project's Lightning callbacks.

- ``SaveRunBundle``: the resolved ``config.yaml`` and ``run_info.json`` of a run (the CLI's save-config callback).
- ``MetricsJsonWriter``: ``metrics.json``, every metric logged so far.
- ``RandomState``: the random states, kept in every checkpoint and restored on resume.
- ``ExpertAttentionWriter``: ConCare's ``expert_attention.jsonl``, the expert signal for stages 1 and 2.

Each writes a stage's artefacts into the run directory (``trainer.default_root_dir``).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

from eagrl.data.batch import collate_samples
from eagrl.data.cohort import SPLITS
from eagrl.io import atomic_path, write_json_atomic, write_text_atomic
from eagrl.paths import REPO_ROOT

log = logging.getLogger(__name__)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("eagrl", "torch", "lightning", "transformers", "peft", "torchmetrics", "numpy", "pandas"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


class SaveRunBundle(SaveConfigCallback):
    """Write the resolved ``config.yaml`` and ``run_info.json`` into ``trainer.default_root_dir``.

    They are written when the stage starts, after the data, the model and the expert file were read: a
    run that stops on bad input leaves an earlier run's files in that directory as they were.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any):
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, **kwargs)
        self._stage: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self._stage = stage

    def _save_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved or self._stage is None:
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, self._stage)
        self.already_saved = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        text = self.parser.dump(self.config, skip_none=False)
        write_text_atomic(root / self.config_filename, text)
        write_json_atomic(
            root / "run_info.json",
            {
                "stage": stage,
                "seed": self.config.get("seed_everything"),
                "command": sys.argv[1:2],
                "git_revision": _git_revision(),
                "versions": _versions(),
            },
        )


class MetricsJsonWriter(L.Callback):
    """Keep ``<default_root_dir>/metrics.json`` up to date with every metric logged so far.

    Metrics of earlier stages of the same run directory (e.g. ``fit`` then ``test``) are kept; a
    metric logged again replaces its old value. The file is replaced atomically.
    """

    filename = "metrics.json"

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = Path(trainer.default_root_dir) / self.filename
        metrics: dict[str, float] = {}
        if path.is_file():
            try:
                metrics = json.loads(path.read_text())
            except ValueError:
                metrics = {}
        for name, value in trainer.callback_metrics.items():
            number = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            metrics[name] = number if math.isfinite(number) else None
        metrics.update(getattr(trainer.datamodule, "input_report", None) or {})  # an external cohort: absent features, units
        info = getattr(pl_module, "generation_info", None) if pl_module is not None else None
        if info:  # how an LLM stage generated: dtype (and how it was chosen), prefill chunk, cache, batch size
            metrics["generation"] = info
        write_json_atomic(path, dict(sorted(metrics.items())))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "generation_info", None):  # stage 1 logs no metric; its generation settings are kept
            self._write(trainer, pl_module)


class RandomState(L.Callback):
    """Keep the torch, CUDA, numpy and Python random states in every checkpoint and restore them on resume.

    A run resumed from an epoch-end checkpoint then draws the same shuffles, dropout masks and samples
    as the run that was not interrupted. Stored as tensors and plain values, so a checkpoint still loads
    with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        from eagrl.distributed import gather_objects

        kind, keys, position, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next],
        }
        return {"ranks": gather_objects(mine)}  # every rank's own state (each rank samples differently)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np

        from eagrl.distributed import rank

        ranks = state.get("ranks", [state])
        state = ranks[rank()] if rank() < len(ranks) else ranks[0]  # resumed on more ranks: the rest start from rank 0's
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


class ExpertAttentionWriter(L.Callback):
    """After testing, write ``expert_attention.jsonl``: the expert signal for stages 1 and 2.

    One line per sample of every split: ``{"id", "split", "label", "prob", "features": [[name, weight],
    ...] (weight descending), "top_k": [names]}``. Written to a temporary file and renamed.

    Only features the patient had measured (a raw value on at least one observed day) are ranked: a
    never-measured feature reaches ConCare as a constant imputed token, and naming it would reward the LLM
    for a feature it saw only as "NA". A patient with fewer than ``top_k`` measured features gets a shorter
    list; the prediction is unchanged. How often the mask changed a top-k (fractions of patients and of
    top-k slots that named a never-measured feature) goes to ``expert_attention_mask.json`` beside the file.

    Args:
        filename: file name inside ``trainer.default_root_dir``.
        top_k: features named in ``top_k`` (default: the model's ``top_k`` hyperparameter, else 5).
        batch_size: samples per forward pass.
    """

    def __init__(self, filename: str = "expert_attention.jsonl", top_k: PositiveInt | None = None, batch_size: PositiveInt = 256):
        self.filename, self.top_k, self.batch_size = filename, top_k, batch_size

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        datamodule = trainer.datamodule
        names = list(pl_module.hparams.feature_names)
        top_k = self.top_k or int(pl_module.hparams.get("top_k", 5))
        path = Path(trainer.default_root_dir) / self.filename
        n_demo = int(pl_module.hparams.n_demographic)
        was_training = pl_module.training
        pl_module.eval()
        patients = changed = slots = unmasked_slots = shorter = 0
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for split in SPLITS:
                dataset = datamodule.datasets[split]
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=self.batch_size, shuffle=False, collate_fn=datamodule_collate(datamodule)
                )
                for batch in loader:
                    batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    out = pl_module(batch)
                    probs = torch.sigmoid(out["logit"]).tolist()
                    measured = measured_features(batch["missing"][..., n_demo:], batch["mask"]).tolist()  # [B][F]
                    for i, weights in enumerate(out["attention"].tolist()):
                        ranked, top = rank_features(names, weights, top_k, measured[i])
                        _, plain = rank_features(names, weights, top_k)
                        unmeasured = {name for name, seen in zip(names, measured[i]) if not seen}
                        patients += 1
                        changed += top != plain
                        slots += len(unmeasured.intersection(plain))
                        unmasked_slots += len(plain)
                        shorter += len(top) < top_k
                        record = {"id": batch["id"][i], "split": split, "label": int(batch["label"][i])}
                        record.update(prob=round(probs[i], 6), features=ranked, top_k=top)
                        handle.write(json.dumps(record) + "\n")
        pl_module.train(was_training)
        report = {
            "patients": patients,
            "top_k": top_k,
            "patients_whose_top_k_the_mask_changed": changed,
            "fraction_of_patients_changed": round(changed / max(patients, 1), 4),
            "fraction_of_top_k_slots_never_measured": round(slots / max(unmasked_slots, 1), 4),
            "patients_with_fewer_than_top_k_measured": shorter,
        }
        write_json_atomic(path.with_name(path.stem + "_mask.json"), report)
        log.info("expert attention: the measured-feature mask changed the top-%d of %d of %d patients", top_k, changed, patients)
        return path

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer, pl_module)


def measured_features(missing: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, F] bool: a raw value on at least one real day. missing: [B, T, F] bool; mask: [B, T] real days."""
    return (~missing & mask[..., None]).any(dim=1)


def rank_features(names: list[str], weights: list[float], top_k: int, measured: list[bool] | None = None) -> tuple[list[list], list[str]]:
    """``([[name, weight], ...] by weight descending (ties: feature order), [the top_k names])``, over the
    features with ``measured[j]`` True only (None: every feature)."""
    order = sorted((j for j in range(len(names)) if measured is None or measured[j]), key=lambda j: -weights[j])
    ranked = [[names[j], round(float(weights[j]), 6)] for j in order]
    return ranked, [names[j] for j in order[:top_k]]


def datamodule_collate(datamodule: L.LightningDataModule):
    return getattr(datamodule, "collate_fn", collate_samples)
