"""Callbacks that write a stage's artefacts into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import PositiveInt

from eagrl.data.cohort import SPLITS
from eagrl.io import atomic_path


class ExpertAttentionWriter(L.Callback):
    """After testing, write ``expert_attention.jsonl``: the expert signal for stages 1 and 2.

    One line per sample of every split: ``{"id", "split", "label", "prob", "features": [[name, weight],
    ...] (weight descending), "top_k": [names]}``. Written to a temporary file and renamed.

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
        was_training = pl_module.training
        pl_module.eval()
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
                    for i, weights in enumerate(out["attention"].tolist()):
                        ranked, top = rank_features(names, weights, top_k)
                        record = {"id": batch["id"][i], "split": split, "label": int(batch["label"][i])}
                        record.update(prob=round(probs[i], 6), features=ranked, top_k=top)
                        handle.write(json.dumps(record) + "\n")
        pl_module.train(was_training)
        return path

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer, pl_module)


def rank_features(names: list[str], weights: list[float], top_k: int) -> tuple[list[list], list[str]]:
    """``([[name, weight], ...] by weight descending (ties: feature order), [the top_k names])``."""
    order = sorted(range(len(names)), key=lambda j: -weights[j])
    ranked = [[names[j], round(float(weights[j]), 6)] for j in order]
    return ranked, [names[j] for j in order[:top_k]]


def datamodule_collate(datamodule: L.LightningDataModule):
    from datamodules.ehr import collate_samples

    return getattr(datamodule, "collate_fn", collate_samples)
