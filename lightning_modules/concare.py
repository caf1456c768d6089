"""The expert system: trains ConCare (loss = BCE + decov_weight x DeCov), evaluates with bootstrap.

The network's input sizes come from the datamodule at ``setup`` (and are stored in the hyperparameters,
so ``load_from_checkpoint`` rebuilds the same network). Validation and test log AUROC, AUPRC, F1 and
accuracy as mean and std over ``n_bootstrap`` resamples (``val/auprc``, ``test/auroc_std``, ...).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torchmetrics import CatMetric

from eagrl.distributed import unique_in_order
from eagrl.errors import EAGRLInputError
from eagrl.evaluation import bootstrap_metrics, subgroup_metrics
from eagrl.models import ConCare


class ConCareModule(L.LightningModule):
    """ConCare expert.

    Args:
        hidden: GRU and token width.
        heads: self-attention heads across feature tokens.
        ffn_hidden: feed-forward width.
        dropout: dropout rate.
        faithful_attention: pool each feature's own token in the final attention, so its weights point
            at the features that drive the prediction (see ``eagrl.models.concare``); false: the reference.
        decov_weight: weight of the DeCov term in the loss (group: 10; original paper: 1000).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        n_bootstrap: bootstrap resamples for validation/test metrics (0: point estimates only).
        bootstrap_seed: seed of the resamples.
        top_k: features per patient named in the expert attention export.
        test_after_fit: after ``fit``, evaluate the best checkpoint on val and test in the same command.
        feature_names: dynamic feature names (filled from the datamodule at setup).
        n_demographic: number of demographic inputs (filled from the datamodule at setup).
    """

    def __init__(
        self,
        hidden: PositiveInt = 128,
        heads: PositiveInt = 4,
        ffn_hidden: PositiveInt = 64,
        dropout: float = 0.0,
        faithful_attention: bool = True,
        decov_weight: float = 10.0,
        lr: PositiveFloat = 1e-3,
        weight_decay: float = 1e-2,
        n_bootstrap: NonNegativeInt = 100,
        bootstrap_seed: int = 0,
        top_k: PositiveInt = 5,
        test_after_fit: bool = True,
        feature_names: Optional[list[str]] = None,
        n_demographic: Optional[int] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.test_after_fit = test_after_fit
        self.net: ConCare | None = None
        if feature_names is not None and n_demographic is not None:
            self._build(feature_names, n_demographic)
        self.probs = torch.nn.ModuleDict({s: CatMetric(nan_strategy="disable") for s in ("val", "test")})
        self.labels = torch.nn.ModuleDict({s: CatMetric(nan_strategy="disable") for s in ("val", "test")})
        self.indices = torch.nn.ModuleDict({s: CatMetric(nan_strategy="disable") for s in ("val", "test")})
        self.losses = torch.nn.ModuleDict({s: CatMetric(nan_strategy="disable") for s in ("val", "test")})  # per sample, with its batch's DeCov

    def _build(self, feature_names: list[str], n_demographic: int) -> None:
        hp = self.hparams
        self.hparams.feature_names, self.hparams.n_demographic = list(feature_names), int(n_demographic)
        self.net = ConCare(len(feature_names), n_demographic, hp.hidden, hp.heads, hp.ffn_hidden, hp.dropout, hp.faithful_attention)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule.hparams.get("shuffle_fraction"):
            raise EAGRLInputError(
                "data.shuffle_fraction shuffles the feature order of the LLM's text; ConCare reads one GRU per feature and "
                "is order-invariant by construction, so it has no feature order to shuffle (leave it at 0)"
            )
        if datamodule.cohort is None:
            datamodule.setup(stage)
        features = datamodule.cohort.raw.features
        names = [f.name for f in features if not f.demographic]
        if self.net is not None:  # built from a checkpoint's hyperparameters (`--ckpt_path` fills them in)
            _check_same_features(self.hparams.feature_names, names, "the model")
            return
        self._build(names, sum(f.demographic for f in features))

    # ------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n_demo = self.hparams.n_demographic
        return self.net(batch["x"][..., n_demo:], batch["demographics"], batch["mask"], batch["days"])

    def _check_finite(self, batch: dict[str, Any]) -> None:
        """Stop on the first NaN/inf input (a preprocessing bug) instead of a NaN loss steps later."""
        for key in ("x", "demographics"):
            finite = torch.isfinite(batch[key])
            if bool(finite.all()):
                continue
            bad = (~finite).nonzero()[0].tolist()  # [b, (t,) f]
            column = bad[-1]
            names = list(self.hparams.feature_names)
            n_demo = self.hparams.n_demographic
            if key == "x":
                name = f"demographic input {column}" if column < n_demo else f"feature {names[column - n_demo]!r}"
            else:
                name = f"demographic input {column}"
            where = f", day index {bad[1]}" if key == "x" else ""
            raise EAGRLInputError(
                f"non-finite value ({batch[key][tuple(bad)].item()}) in {name} of the sample at batch position "
                f"{bad[0]}{where}: the preprocessed inputs must be finite (rebuild the cache with "
                "--data.init_args.rebuild_cache true; if it persists this is a preprocessing bug)"
            )

    def on_test_start(self) -> None:
        """An external cohort (``split: all``) is normalised with the training statistics the checkpoint holds."""
        require = getattr(self.trainer.datamodule, "require_training_statistics", None)
        if require is not None:
            require()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on another feature set, listing the mismatch."""
        saved = checkpoint.get("hyper_parameters", {}).get("feature_names")
        if saved is not None and self.hparams.get("feature_names") is not None:
            _check_same_features(saved, self.hparams.feature_names, "the checkpoint")

    def model_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_finite(batch)
        out = self(batch)
        bce = F.binary_cross_entropy_with_logits(out["logit"], batch["label"])
        loss = bce + self.hparams.decov_weight * out["decov"]
        return loss, {"bce": bce, **out}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, out = self.model_step(batch)
        size = len(batch["label"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/bce", out["bce"], on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/decov", out["decov"], on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def _eval_step(self, split: str, batch: dict[str, Any]) -> None:
        _, out = self.model_step(batch)
        bce = F.binary_cross_entropy_with_logits(out["logit"], batch["label"], reduction="none")
        self.losses[split].update(bce + self.hparams.decov_weight * out["decov"])
        self.probs[split].update(torch.sigmoid(out["logit"]))
        self.labels[split].update(batch["label"])
        self.indices[split].update(batch["index"].float())

    def _eval_epoch_end(self, split: str) -> None:
        kept = (self.indices, self.probs, self.labels, self.losses)
        gathered = [metric[split].compute() for metric in kept]  # across ranks
        indices, probs, labels, losses = unique_in_order(*gathered)  # every sample once, in dataset order: as in one process
        for metric in kept:
            metric[split].reset()
        metrics = bootstrap_metrics(probs, labels, self.hparams.n_bootstrap, self.hparams.bootstrap_seed)
        metrics["loss"] = float(losses.double().mean())
        if split == "test":
            sex, age = self.trainer.datamodule.datasets[split].sex_age(indices.long().tolist())
            metrics.update(subgroup_metrics(probs, labels, torch.from_numpy(sex), torch.from_numpy(age)))
        self.log_dict({f"{split}/{k}": v for k, v in metrics.items()})

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        return {"id": batch["id"], "label": batch["label"], "prob": torch.sigmoid(out["logit"]), "attention": out["attention"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _check_same_features(trained: list[str], current: list[str], what: str) -> None:
    """Raise ``EAGRLInputError`` listing the difference when ``trained`` and ``current`` differ."""
    if list(trained) == list(current):
        return
    missing = [n for n in current if n not in trained]
    extra = [n for n in trained if n not in current]
    detail = f"features missing from {what}: {missing}; features only in {what}: {extra}"
    if not missing and not extra:
        detail = "the same features in a different order"
    raise EAGRLInputError(f"{what} was trained on {len(trained)} features, this data has {len(current)}: {detail}")
