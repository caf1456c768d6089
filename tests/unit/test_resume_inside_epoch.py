"""A fit stopped inside an epoch and resumed from its last checkpoint trains on the batches the uninterrupted fit
would have, each once (``datamodules.sampling``: ``EpochShuffle`` skips the batches the checkpoint had trained on).

Lightning restarts the epoch's loader from its first batch on such a resume while its step count goes on from the
checkpoint's; without the skip, the resumed fit trains again on the epoch's first batches and never on its last ones
(``test_without_the_skip...`` shows it). Checked for a checkpoint after every batch (RL), at epoch ends (ConCare,
SFT) and after a validation run inside the epoch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.sampling import EpochShuffle, make_loader, resumed_batches

N, BATCH, EPOCHS = 10, 2, 2  # 5 batches per epoch


class Stop(Exception):
    pass


class Recorder(L.LightningModule):
    """Records (global step, samples) of every training batch; raises ``Stop`` at the global step ``stop_at``."""

    def __init__(self, stop_at: int | None, skip: bool = True, workers: int = 0):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.stop_at, self.skip, self.workers = stop_at, skip, workers
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        if self.stop_at is not None and self.global_step == self.stop_at:
            raise Stop
        self.seen.append((self.global_step, [int(x) for x in batch]))
        return self.layer(batch.float().unsqueeze(1)).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch.float().unsqueeze(1)).sum())

    def configure_optimizers(self):
        _ = self.trainer.estimated_stepping_batches  # as RLModule's schedule does: a loader made before the restore
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        done = (lambda: resumed_batches(self.trainer)) if self.skip else None
        return make_loader(torch.arange(N), BATCH, True, torch.stack, self.workers, epoch_of=lambda: self.trainer.current_epoch, done_of=done)

    def val_dataloader(self):
        return make_loader(torch.arange(4), 2, False, torch.stack)


def _fit(root, model: Recorder, resume: bool, every: str = "step") -> None:
    """``every``: a checkpoint after every batch (``step``, as RL), at epoch ends (``epoch``, as ConCare and SFT), or
    after a validation run every 2 batches (``validation``, inside the epoch)."""
    kinds = {"step": {"every_n_train_steps": 1}, "epoch": {}, "validation": {"save_on_train_epoch_end": False}}
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=1, filename="latest", enable_version_counter=False, **kinds[every])
    validate = every == "validation"
    trainer = L.Trainer(
        max_epochs=EPOCHS, callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, accelerator="cpu", devices=1, val_check_interval=2 if validate else None,
        limit_val_batches=1 if validate else 0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=str(root / "last.ckpt") if resume else None)


def _history(root, stops: list[int], skip: bool = True, every: str = "step", workers: int = 0) -> list[tuple[int, list[int]]]:
    """The batches behind the final weights of a fit stopped at each global step of ``stops`` and resumed from its last
    checkpoint: a resumed run's batches replace those the stopped run trained on after that checkpoint."""
    history: list[tuple[int, list[int]]] = []
    for k, stop in enumerate([*stops, None]):
        model = Recorder(stop, skip, workers)
        if stop is None:
            _fit(root, model, resume=k > 0, every=every)
        else:
            with pytest.raises(Stop):
                _fit(root, model, resume=k > 0, every=every)
        if model.seen:
            history = [entry for entry in history if entry[0] < model.seen[0][0]] + model.seen
    return history


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[tuple[int, list[int]]]:
    model = Recorder(None)
    _fit(tmp_path_factory.mktemp("reference"), model, resume=False)
    assert len(model.seen) == EPOCHS * N // BATCH
    for epoch in range(EPOCHS):  # each sample once per epoch
        assert sorted(x for _, batch in model.seen[epoch * 5 : (epoch + 1) * 5] for x in batch) == list(range(N))
    return model.seen


@pytest.mark.parametrize(
    "stops, every",
    [([3], "step"), ([2, 3], "step"), ([5], "step"), ([6, 8], "step"), ([7], "epoch"), ([3], "validation")],
    ids=["mid-epoch", "twice-in-one-epoch", "at-epoch-end", "twice-in-epoch-two", "epoch-end-checkpoint", "validation-checkpoint"],
)  # fmt: skip
def test_a_fit_resumed_inside_an_epoch_trains_on_the_uninterrupted_batches(reference, tmp_path, stops, every):
    assert _history(tmp_path, stops, every=every) == reference


def test_a_train_loader_with_a_worker_process_reads_the_order_before_the_restore(reference, tmp_path):
    """Why ``EHRDataModule`` keeps its shuffled train loader in the main process: with a worker, even a resume from
    an epoch-end checkpoint trains its next epoch in the first epoch's order."""
    assert _history(tmp_path, [7], every="epoch", workers=1) != reference


def test_the_datamodules_train_loader_stays_in_the_main_process(tjh_module):
    tjh_module.num_workers = 2
    try:
        assert tjh_module.train_dataloader().num_workers == 0 and tjh_module.test_dataloader().num_workers == 2
    finally:
        tjh_module.num_workers = 0


def test_without_the_skip_a_resumed_epoch_trains_on_its_first_batches_again(reference, tmp_path):
    got = _history(tmp_path, [3], skip=False)
    assert len(got) == len(reference)
    assert got != reference and got[3][1] == reference[0][1]  # what the skip is there for


def test_epoch_shuffle_skips_the_given_samples_of_this_ranks_order():
    data = list(range(9))
    whole = list(EpochShuffle(data, seed=3))
    skipped = EpochShuffle(data, seed=3, skip_of=lambda: 4)
    assert list(skipped) == whole[4:] and len(skipped) == len(whole)
    assert sorted(whole) == data
    assert resumed_batches(None) == 0
