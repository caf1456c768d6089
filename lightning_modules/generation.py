"""The generation settings an LLM stage runs with, shared by the stages that generate (prompting, SFT and
RL evaluation, RL rollouts, stage 1's search)."""

from __future__ import annotations

from typing import Any

from eagrl.llm.generation import Engine
from eagrl.models.backbone import generation_engine


class UsesGenerationEngine:
    """Mixin for a LightningModule with ``backbone_options`` and ``hparams.generation_batch_size``.

    The engine is resolved when fit, test or predict starts (the module is on its device by then); under
    several processes rank 0's choice is broadcast, so every rank generates in the same dtype."""

    def _resolve_engine(self) -> None:
        engine = generation_engine(self.backbone_options, self.device)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            engine = trainer.strategy.broadcast(engine, src=0)
        self._engine = engine

    def on_fit_start(self) -> None:
        self._resolve_engine()

    def on_test_start(self) -> None:
        self._resolve_engine()

    def on_predict_start(self) -> None:
        self._resolve_engine()

    @property
    def engine(self) -> Engine:
        """How this module generates (``BackboneOptions.generation_dtype`` resolved on its device)."""
        if getattr(self, "_engine", None) is None:  # used outside a Trainer's fit/test/predict
            self._engine = generation_engine(self.backbone_options, self.device)
        return self._engine

    @property
    def generation_info(self) -> dict[str, Any]:
        """What ``metrics.json`` records under ``generation``."""
        return {**self.engine.describe(), "batch_size": self.hparams.generation_batch_size}
