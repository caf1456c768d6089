"""``TrajectoryDataModule``: stage 1's distilled trajectories as SFT examples, on top of the EHR data.

Training examples are the kept trajectories of the ``train`` split's patients in ``trajectories.jsonl``
(optionally balanced: as many positive as negative patients), validation examples those of ``val``. An
example is ``{"id", "split", "index", "label", "trajectory"}``: the module rebuilds the patient's prompt
from the EHR text (``index`` into ``datasets[split]``), so the file holds no prompt. ``test`` (and the
answer evaluation after fit) runs over patients of the val and test splits (``eval_splits``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from datamodules.ehr import EHRDataModule
from datamodules.sampling import make_loader
from eagrl.data.balance import balance_patients
from eagrl.errors import EAGRLInputError

log = logging.getLogger(__name__)


def collate_examples(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(items)


class TrajectoryDataModule(EHRDataModule):
    """EHR data plus distilled trajectories (see the module docstring).

    Args:
        trajectories: stage 1's ``trajectories.jsonl``.
        balance: train on as many positive as negative patients.
        balance_seed: seed of that subsampling.
        eval_splits: splits whose patients ``test`` answers (the fine-tuned model's own predictions).
        **kwargs: ``EHRDataModule``'s arguments.
    """

    def __init__(
        self,
        trajectories: str,
        balance: bool = True,
        balance_seed: int = 0,
        eval_splits: list[str] = ["val", "test"],  # noqa: B006
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.trajectories_path = Path(trajectories).expanduser()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def _read(self) -> list[dict[str, Any]]:
        if not self.trajectories_path.is_file():
            raise EAGRLInputError(
                f"data.trajectories: {self.trajectories_path} does not exist: run stage 1 first "
                "(python -m eagrl predict --config configs/<dataset>/distill.yaml)"
            )
        records = []
        with open(self.trajectories_path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records.append({k: record[k] for k in ("id", "split", "label", "trajectory")})
                except (ValueError, KeyError, TypeError) as err:
                    raise EAGRLInputError(f"{self.trajectories_path}, line {number}: not a trajectory record: {err}") from None
        return records

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        positions = {split: {sample: i for i, sample in enumerate(data.ids)} for split, data in self.datasets.items()}
        records = self._read()
        for split in ("train", "val"):
            chosen = [r for r in records if r["split"] == split]
            missing = [r for r in chosen if r["id"] not in positions[split]]
            if missing:
                raise EAGRLInputError(
                    f"{self.trajectories_path}: {len(missing)} {split} trajectories name patients this dataset's {split} "
                    "split does not have: the file was made for another dataset, task or split"
                )
            if split == "train" and self.hparams.balance:
                balanced = balance_patients(chosen, self.hparams.balance_seed)
                if chosen and not balanced:  # one outcome only: balancing would leave nothing to learn from
                    log.warning(
                        "%s: the train trajectories are all of one outcome; training on them unbalanced", self.trajectories_path
                    )
                else:
                    chosen = balanced
            self.examples[split] = [{**r, "index": positions[split][r["id"]]} for r in chosen]
        if not self.examples["train"]:
            raise EAGRLInputError(f"{self.trajectories_path} holds no train trajectories to fine-tune on")

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.examples["train"], self.batch_size, True, collate_examples, epoch_of=self._current_epoch, done_of=self._resumed)

    def val_dataloader(self) -> DataLoader | list:
        if not self.examples.get("val"):
            return []
        return make_loader(self.examples["val"], self.batch_size, False, collate_examples)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per ``eval_splits`` split; ``eval_patients`` (a balanced seeded subset) applies to each."""
        return [self._loader(s, shuffle=False, size=self.hparams.eval_patients, batch_size=self.hparams.eval_batch_size) for s in self.hparams.eval_splits]
