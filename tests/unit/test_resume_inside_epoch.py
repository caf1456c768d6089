"""A fit stopped inside an epoch and resumed from its last checkpoint trains on the batches the uninterrupted fit
would have, each once (``datamodules.sampling``: ``EpochShuffle`` skips the batches the checkpoint had trained on).

Lightning restarts the epoch's loader from its first batch on such a resume while its step count goes on; without
the skip, the resumed fit trains again on the epoch's first batches and never on its last ones (the first test's
``skip=False`` case shows it)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.sampling import EpochShuffle, make_loader, resumed_batches


class Stop(Exception):
    pass


class Recorder(L.LightningModule):
    """Records the samples of every training batch; raises ``Stop`` before the step ``stop_at`` (global step)."""

    def __init__(self, n: int, batch_size: int, stop_at: int | None, skip: bool = True):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.n, self.batch_size, self.stop_at, self.skip = n, batch_size, stop_at, skip
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        if self.stop_at is not None and self.global_step == self.stop_at:
            raise Stop
        self.seen.append([int(x) for x in batch])
        return self.layer(batch.float().unsqueeze(1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        done = (lambda: resumed_batches(self.trainer)) if self.skip else None
        return make_loader(torch.arange(self.n), self.batch_size, True, torch.stack, epoch_of=lambda: self.trainer.current_epoch, done_of=done)


def _fit(root, model: Recorder, epochs: int, resume: bool) -> None:
    every_step = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=1, filename="latest", enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[every_step], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=str(root / "last.ckpt") if resume else None)


def _interrupted(root, n: int, batch_size: int, epochs: int, stops: list[int], skip: bool = True) -> list[list[int]]:
    """The batches trained on by a fit stopped before each step of ``stops`` and resumed from its last checkpoint."""
    seen: list[list[int]] = []
    for k, stop in enumerate([*stops, None]):
        model = Recorder(n, batch_size, stop, skip)
        if stop is None:
            _fit(root, model, epochs, resume=k > 0)
        else:
            with pytest.raises(Stop):
                _fit(root, model, epochs, resume=k > 0)
        seen += model.seen
    return seen


@pytest.mark.parametrize("stops", [[3], [2, 3], [5], [6, 8]], ids=["mid-epoch", "twice-in-one-epoch", "at-epoch-end", "twice-in-epoch-two"])
def test_a_fit_resumed_inside_an_epoch_trains_on_the_uninterrupted_batches(tmp_path, stops):
    n, batch_size, epochs = 10, 2, 2  # 5 batches per epoch
    reference = Recorder(n, batch_size, None)
    _fit(tmp_path / "reference", reference, epochs, resume=False)
    assert len(reference.seen) == epochs * n // batch_size
    got = _interrupted(tmp_path / "killed", n, batch_size, epochs, stops)
    assert got == reference.seen
    for epoch in range(epochs):  # each sample once per epoch
        per_epoch = sorted(x for batch in got[epoch * 5 : (epoch + 1) * 5] for x in batch)
        assert per_epoch == list(range(n))


def test_without_the_skip_a_resumed_epoch_trains_on_its_first_batches_again(tmp_path):
    n, batch_size = 10, 2
    reference = Recorder(n, batch_size, None, skip=False)
    _fit(tmp_path / "reference", reference, 1, resume=False)
    got = _interrupted(tmp_path / "killed", n, batch_size, 1, [3], skip=False)
    assert len(got) == len(reference.seen)
    assert got != reference.seen and got[3] == reference.seen[0]  # what the skip is there for


def test_epoch_shuffle_skips_the_given_samples_of_this_ranks_order():
    data = list(range(9))
    whole = list(EpochShuffle(data, seed=3))
    skipped = EpochShuffle(data, seed=3, skip_of=lambda: 4)
    assert list(skipped) == whole[4:] and len(skipped) == len(whole)
    assert sorted(whole) == data
    assert resumed_batches(None) == 0
