"""Callbacks that write a stage's artefacts into the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import PositiveInt

from eagrl.data.cohort import SPLITS
from eagrl.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


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
    from datamodules.ehr import collate_samples

    return getattr(datamodule, "collate_fn", collate_samples)
