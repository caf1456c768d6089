"""Stage 1 as a ``predict`` run: expert-guided MCTS over the LLM's decomposition trajectories.

``python -m eagrl predict --config configs/tjh/distill.yaml --trainer.default_root_dir DIR`` searches
every patient of ``data.predict_splits`` (batches of patients, all their expansions batched together),
keeps the best trajectories per patient (``selection``) and appends them to ``DIR/trajectories.jsonl``
through ``TrajectoryWriter``; rerunning the command resumes (see ``eagrl.mcts.store``).

Determinism: each batch is searched under a seed made of ``seed``, the dataloader and the batch index.
A batch with any unfinished patient is searched again whole (only its unfinished patients are written),
so a resumed run writes exactly what an uninterrupted one would have. A rerun resumes only under the settings
the file was written with (``<filename>.settings.json``): with any other search, sampling, selection, reward, model or
text setting, the earlier files are moved to ``stale-<n>/`` in the run directory (nothing is deleted) and the search
starts again, so one trajectory file never mixes two stage-1 configurations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter

from eagrl.data.expert import load_expert_attention
from eagrl.errors import EAGRLInputError
from eagrl.io import write_json_atomic
from eagrl.llm.parsing import FeatureMatcher
from eagrl.llm.prompts import PromptFitter
from eagrl.mcts.policy import LLMPolicy, PolicySampling
from eagrl.mcts.search import Patient, SearchConfig, search
from eagrl.mcts.selection import SelectionConfig, select_trajectories
from eagrl.mcts.store import TrajectoryStore, merge_stores
from eagrl.models.backbone import BackboneOptions, context_length, load_backbone
from eagrl.rl.rewards import RewardConfig
from lightning_modules.generation import UsesGenerationEngine

log = logging.getLogger(__name__)

# settings that do not change what the search writes (where files are, how it is shown, how many patients are asked for)
UNWRITTEN_MODEL_KEYS = {"expert_attention"}
UNWRITTEN_BACKBONE_KEYS = {"cache_dir", "progress"}
UNWRITTEN_DATA_KEYS = {
    "data_dir", "cache_dir", "num_workers", "rebuild_cache", "progress", "chunk_size", "eval_batch_size", "eval_patients",
    "predict_splits", "train_patients",
}  # fmt: skip


def search_settings(module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The settings a trajectory file is written under: the module's and the data's hyperparameters, less the
    ``UNWRITTEN_*`` keys. A JSON-able dict (values that JSON cannot hold are written as text)."""
    model = {k: v for k, v in dict(module.hparams).items() if k not in UNWRITTEN_MODEL_KEYS}
    if isinstance(model.get("backbone"), dict):
        model["backbone"] = {k: v for k, v in model["backbone"].items() if k not in UNWRITTEN_BACKBONE_KEYS}
    data = {k: v for k, v in dict(datamodule.hparams).items() if k not in UNWRITTEN_DATA_KEYS}
    return json.loads(json.dumps({"model": model, "data": data}, sort_keys=True, default=str))


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class TrajectoryWriter(BasePredictionWriter):
    """Appends each finished patient's kept trajectories to ``<default_root_dir>/<filename>`` (resumable).

    With several processes (``--trainer.devices N``, ``use_distributed_sampler: false`` so that each rank
    searches whole batches), rank r appends to ``<filename>.part<r>``; at the end rank 0 merges the parts
    into ``<filename>`` in dataset order, each patient once. A rerun (any number of processes) skips every
    patient finished in the merged file or in any part, so each rank resumes where it stopped.

    Args:
        filename: the trajectory file in the run directory.
    """

    def __init__(self, filename: str = "trajectories.jsonl"):
        super().__init__(write_interval="batch")
        self.filename = filename
        self.store: TrajectoryStore | None = None

    def _parts(self, root: Path) -> list[TrajectoryStore]:
        paths = sorted(p for p in root.glob(f"{self.filename}.part*") if not p.name.endswith((".done", ".tmp")))
        return [TrajectoryStore(p) for p in paths]

    def _files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.glob(f"{self.filename}*") if p.is_file() and p.name != f"{self.filename}.settings.json")

    def check_settings(self, root: Path, settings: dict[str, Any]) -> None:
        """Keep the trajectory files only if they were written under ``settings``; else move them (and their
        settings record) to a new ``stale-<n>/`` folder of ``root`` and record ``settings``."""
        record = root / f"{self.filename}.settings.json"
        earlier = json.loads(record.read_text()) if record.is_file() else None
        files = self._files(root)
        if earlier != settings and files:
            n = 1
            while (root / f"stale-{n}").exists():
                n += 1
            stale = root / f"stale-{n}"
            stale.mkdir()
            for path in files + ([record] if record.is_file() else []):
                path.rename(stale / path.name)
            changed = "the settings were not recorded" if earlier is None else "changed: " + ", ".join(_changed_keys(earlier, settings))
            log.warning(
                "%s: %d patient(s) were searched under other settings (%s); those files are moved to %s and the search starts again",
                root / self.filename, len(TrajectoryStore(stale / self.filename).finished()), changed, stale,
            )  # fmt: skip
        if earlier != settings:  # also when no record was written (earlier is None)
            write_json_atomic(record, settings)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            self.check_settings(root, search_settings(pl_module, trainer.datamodule))
        trainer.strategy.barrier()  # every rank reads the files only after rank 0 has checked them
        final = TrajectoryStore(root / self.filename)
        if trainer.world_size == 1:
            self.store = final
        else:
            self.store = TrajectoryStore(root / f"{self.filename}.part{trainer.global_rank}")
            trainer.strategy.barrier()  # the run directory exists on every rank before any part is written
        self.store.recover()
        for other in [final, *self._parts(root)]:  # finished by an earlier run, or by another rank
            if other.path != self.store.path:
                self.store.done |= other.finished()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        for patient in prediction or []:
            self.store.append(patient["id"], patient["lines"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        root = Path(trainer.default_root_dir)
        parts = self._parts(root)
        if trainer.is_global_zero and parts:
            datamodule = trainer.datamodule
            order = {
                str(sample): (s, k)
                for s, split in enumerate(datamodule.hparams.predict_splits)
                for k, sample in enumerate(datamodule.datasets[split].ids)
            }
            merge_stores(TrajectoryStore(root / self.filename), parts, order)
        trainer.strategy.barrier()


class DistillModule(UsesGenerationEngine, L.LightningModule):
    """Expert-guided trajectory distillation (``predict`` only).

    Args:
        expert_attention: the ConCare run's ``expert_attention.jsonl``.
        backbone: the policy LLM.
        search: MCTS settings.
        sampling: sampling of sub-questions, answers and final steps.
        selection: which trajectories of a patient are kept.
        reward: the combined reward's settings.
        top_k: expert features per patient (None: the file's own top_k).
        generation_batch_size: sequences per ``generate`` call.
        max_subquestions: the most sub-questions asked for in the prompt.
        truncate_visits: drop the oldest visits of a prompt longer than the context.
        reuse_prompt_cache: prefill each patient's prompt once per search and continue its KV cache
            (off: every sequence is prefilled again; same results up to float rounding).
        constrain_features: [ours] sample each path's ``<Important Features>`` among the dataset's variable names
            (the model chooses which; ``eagrl.llm.constrained``). For small policies that never name a variable
            on their own, so the search has alignment to select for. Off: free text, as in the paper.
        max_features: the most names a constrained ``<Important Features>`` lists (the expert's k by default).
        constrain_answer: [ours] each path's ``<Final Answer>`` is a probability, ``0.d``, ``0.dd`` or ``1.0``, its
            digits sampled from the model (``eagrl.llm.constrained``). For small policies whose free answers are
            mostly not probabilities, so R_cls scores a prediction and SFT learns an answer the strict reward reads.
            Off: free text, as in the paper.
        seed: base seed of the search.
    """

    def __init__(
        self,
        expert_attention: str,
        backbone: BackboneOptions = BackboneOptions(),
        search: SearchConfig = SearchConfig(),
        sampling: PolicySampling = PolicySampling(),
        selection: SelectionConfig = SelectionConfig(),
        reward: RewardConfig = RewardConfig(),
        top_k: Optional[PositiveInt] = None,
        generation_batch_size: PositiveInt = 16,
        max_subquestions: PositiveInt = 4,
        truncate_visits: bool = True,
        reuse_prompt_cache: bool = True,
        constrain_features: bool = False,
        max_features: PositiveInt = 5,
        constrain_answer: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "search", "sampling", "selection", "reward"])
        self.hparams.update(
            backbone=asdict(backbone), search=asdict(search), sampling=asdict(sampling), selection=asdict(selection), reward=asdict(reward)
        )
        self.backbone_options, self.search_config, self.sampling = backbone, search, sampling
        self.selection, self.reward = selection, reward
        self.llm = None

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule.cohort is None:
            datamodule.setup(stage)
        if "test" in datamodule.hparams.predict_splits:
            raise EAGRLInputError(
                "data.init_args.predict_splits: distillation reads each patient's label to reward its search, so it "
                f"must never search test patients; got {list(datamodule.hparams.predict_splits)} (use [train, val])"
            )
        names = datamodule.cohort.raw.feature_names
        ids = [i for split in datamodule.hparams.predict_splits for i in datamodule.datasets[split].ids]
        self.expert = load_expert_attention(self.hparams.expert_attention, names, ids, self.hparams.top_k)  # before the model
        if self.llm is None:
            self.llm, self.tokenizer = load_backbone(self.backbone_options)
        self.matcher = FeatureMatcher(names)
        self.policy = LLMPolicy(
            self.llm,
            self.tokenizer,
            self.sampling,
            self.hparams.generation_batch_size,
            self.hparams.reuse_prompt_cache,
            feature_names=names if self.hparams.constrain_features else None,
            max_features=self.hparams.max_features,
            constrain_answer=self.hparams.constrain_answer,
        )  # its engine is set when predict starts (the module's device is known then)
        longest = max(self.sampling.subquestion.max_new_tokens + self.sampling.answer.max_new_tokens, self.sampling.final.max_new_tokens)
        limit = context_length(self.llm, self.backbone_options) - self.search_config.max_depth * longest
        self.fit_prompt = PromptFitter(
            self.tokenizer, limit, datamodule.dataset, datamodule.question, "decomposition", self.hparams.max_subquestions, self.hparams.truncate_visits
        )

    def _writer(self) -> Optional[TrajectoryWriter]:
        return next((c for c in self.trainer.callbacks if isinstance(c, TrajectoryWriter)), None)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        writer = self._writer()
        done = writer.store.done if writer is not None and writer.store is not None else set()
        if all(i in done for i in batch["id"]):
            return []
        data = self.trainer.datamodule.datasets
        patients, visits = [], []
        for k, sample in enumerate(batch["id"]):
            prompt, _, shown = self.fit_prompt(data[batch["split"][k]], int(batch["index"][k]))
            patients.append(Patient(sample, prompt, int(batch["label"][k]), self.expert[sample]))
            visits.append(shown)
        # the batch's index in its split (not this rank's count): the same seed however the batches are sharded
        batch_number = int(batch["index"][0]) // self.trainer.datamodule.batch_size
        torch.manual_seed(self.hparams.seed * 1_000_003 + dataloader_idx * 100_003 + batch_number)
        self.policy.engine = self.engine
        results = search(patients, self.policy, self.matcher, self.search_config, self.reward)
        out = []
        for k, result in enumerate(results):
            if result.patient.id in done:
                continue
            kept = select_trajectories(result.trajectories, result.patient.label, self.selection)
            stats = {
                "nodes_expanded": result.nodes_expanded,
                "trajectories_scored": len(result.trajectories),
                "tokens_generated": result.tokens_generated,
                "visits_shown": visits[k],
            }
            lines = [
                {
                    "id": result.patient.id,
                    "split": batch["split"][k],
                    "label": result.patient.label,
                    "rank": rank,
                    "trajectory": trajectory.text,
                    "y_hat": trajectory.y_hat,
                    "features": trajectory.features,
                    "expert_top_k": result.patient.expert_top_k,
                    "r_cls": trajectory.r_cls,
                    "r_att": trajectory.r_att,
                    "reward": trajectory.reward,
                    "depth": trajectory.depth,
                    **stats,
                }
                for rank, trajectory in enumerate(kept)
            ]
            out.append({"id": result.patient.id, "lines": lines})
        return out
