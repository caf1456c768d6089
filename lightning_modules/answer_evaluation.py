"""``AnswerEvaluator``: the answer evaluation shared by the prompting baselines, SFT and RL LightningModules.

In ``test`` it prompts the LLM with every patient of the test dataloader(s), reads ŷ and the named features,
scores them against the expert's top-k, logs the metrics per split and writes the completions to
``<default_root_dir>/<generations_file>`` (never to a logger).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from tqdm.auto import tqdm

from eagrl.data.expert import load_expert_attention
from eagrl.distributed import gather_objects, unique_records
from eagrl.evaluation import bootstrap_metrics, subgroup_metrics
from eagrl.errors import EAGRLInputError
from eagrl.io import atomic_path
from eagrl.llm.generation import ANSWER_CUE, generate, yes_no_probability
from eagrl.llm.parsing import FeatureMatcher, parse_answer
from eagrl.llm.prompts import PromptFitter
from eagrl.models.backbone import context_length
from eagrl.rl.rewards import combined_reward
from lightning_modules.generation import UsesGenerationEngine

ANSWER_READINGS = ("final_answer", "anywhere")


class AnswerEvaluator(UsesGenerationEngine, L.LightningModule):
    """Shared by the prompting baselines and the fine-tuned models: in ``test``, prompt the LLM with every
    patient of the test dataloader(s), read ŷ and the named features, score them, log ``<split>/auroc``,
    ``<split>/auprc`` (bootstrap), ``<split>/parse_rate``, ``<split>/strict_parse_rate``, ``<split>/r_att`` (with an expert file), ... and
    write the completions to ``<default_root_dir>/<generations_file>``.

    Subclasses set ``self.llm``, ``self.tokenizer``, ``self.sampling``, ``self.reward`` and the hparams
    ``style`` (or a class attribute ``style``), ``scorer``, ``answer_reading``, ``generation_batch_size``, ``max_subquestions``, ``expert_attention``, ``top_k``,
    ``truncate_visits``, ``unparsed_probability``, ``n_bootstrap``, ``bootstrap_seed``, ``progress_bar``,
    ``generations_file``, and call ``setup_answers`` once the model is loaded.
    """

    def setup_answers(self, splits: list[str], max_new_tokens: Optional[int] = None) -> None:
        """Load the expert's top-k for ``splits`` and the prompt fitter, leaving ``max_new_tokens``
        (default: the evaluation's) of the context for the completion."""
        reading = self.hparams.get("answer_reading", "final_answer")
        if reading not in ANSWER_READINGS:
            raise EAGRLInputError(f"model.answer_reading must be one of {ANSWER_READINGS}, got {reading!r}")
        datamodule = self.trainer.datamodule
        names = datamodule.cohort.raw.feature_names
        self.matcher = FeatureMatcher(names)
        self.expert = None
        if self.hparams.expert_attention:
            ids = [i for split in splits for i in datamodule.datasets[split].ids]
            self.expert = load_expert_attention(self.hparams.expert_attention, names, ids, self.hparams.top_k)
        style = self.hparams["style"] if "style" in self.hparams else self.style  # a baseline's argument, else the class's
        limit = context_length(self.llm, self.backbone_options) - (max_new_tokens or self.sampling.max_new_tokens)
        self.fit_prompt = PromptFitter(
            self.tokenizer, limit, datamodule.dataset, datamodule.question, style, self.hparams.max_subquestions, self.hparams.truncate_visits
        )

    def on_test_epoch_start(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        total = sum(len(loader.dataset) for loader in loaders)
        self.bar = tqdm(total=total, desc="answering", unit="patient", disable=not self.hparams.progress_bar, leave=False)

    def _gathered_records(self) -> dict[str, list[dict[str, Any]]]:
        """Every rank's records, each patient once, in dataset order (what one process would have)."""
        merged: dict[str, list[dict[str, Any]]] = {}
        for part in gather_objects(self.records):
            for split, records in part.items():
                merged.setdefault(split, []).extend(records)
        datasets = self.trainer.datamodule.datasets
        return {split: unique_records(records, {str(i): k for k, i in enumerate(datasets[split].ids)}) for split, records in merged.items()}

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = batch["split"][0]
        data = self.trainer.datamodule.datasets[split]
        built = [self.fit_prompt(data, int(i)) for i in batch["index"]]
        prompts = [prompt for prompt, _, _ in built]
        generations = generate(self.llm, self.tokenizer, prompts, self.sampling, self.hparams.generation_batch_size, engine=self.engine)
        anywhere = self.hparams.get("answer_reading", "final_answer") == "anywhere"  # runs saved before the option: the default
        parsed = [parse_answer(g.text, self.matcher, anywhere) for g in generations]
        if self.hparams.scorer == "token_probability":
            cued = [p + g.text + ANSWER_CUE for p, g in zip(prompts, generations)]
            y_hat = yes_no_probability(self.llm, self.tokenizer, cued, self.hparams.generation_batch_size)
        else:
            y_hat = [p.probability for p in parsed]
        labels = batch["label"].long().tolist()
        expert = [self.expert[i] if self.expert else [] for i in batch["id"]]
        rewards = combined_reward(y_hat, labels, [p.features for p in parsed], expert, self.reward, [p.unknown_features for p in parsed])
        records = self.records.setdefault(split, [])
        for k, sample in enumerate(batch["id"]):
            records.append(
                {
                    "id": sample,
                    "split": split,
                    "label": labels[k],
                    "y_hat": y_hat[k],
                    "parsed": parsed[k].probability is not None,
                    "parsed_strict": parsed[k].strict_probability is not None,
                    "features": parsed[k].features,
                    "unknown_features": parsed[k].unknown_features,
                    "expert_top_k": expert[k],
                    "r_cls": float(rewards["r_cls"][k]),
                    "r_att": float(rewards["r_att"][k]),
                    "reward": float(rewards["reward"][k]),
                    "prompt_tokens": built[k][1],
                    "visits_shown": built[k][2],
                    "new_tokens": generations[k].new_tokens,
                    "finished": generations[k].finished,
                    "completion": generations[k].text,
                }
            )
        self.bar.update(len(batch["id"]))

    def on_test_epoch_end(self) -> None:
        self.bar.close()
        self.records = self._gathered_records()
        fill = self.hparams.unparsed_probability
        logged: dict[str, float] = {}
        for split, records in self.records.items():
            probs = torch.tensor([r["y_hat"] if r["y_hat"] is not None else fill for r in records], dtype=torch.float64)
            labels = torch.tensor([r["label"] for r in records])
            metrics = bootstrap_metrics(probs, labels, self.hparams.n_bootstrap, self.hparams.bootstrap_seed)
            n = len(records)
            metrics.update(
                parse_rate=sum(r["parsed"] for r in records) / n,
                strict_parse_rate=sum(r["parsed_strict"] for r in records) / n,
                r_cls=sum(r["r_cls"] for r in records) / n,
                reward=sum(r["reward"] for r in records) / n,
                prompt_tokens=sum(r["prompt_tokens"] for r in records) / n,
                new_tokens=sum(r["new_tokens"] for r in records) / n,
                samples=float(n),
            )
            if self.expert is not None:
                metrics["r_att"] = sum(r["r_att"] for r in records) / n
            data = self.trainer.datamodule.datasets[split]
            position = {str(i): k for k, i in enumerate(data.ids)}
            sex, age = data.sex_age([position[str(r["id"])] for r in records])
            metrics.update(subgroup_metrics(probs, labels, torch.from_numpy(sex), torch.from_numpy(age)))
            logged.update({f"{split}/{k}": (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()})
        if logged:
            self.log_dict(logged, add_dataloader_idx=False)
        if self.trainer.is_global_zero and self.records:
            path = Path(self.trainer.default_root_dir) / self.hparams.generations_file
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                for records in self.records.values():
                    for record in records:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
