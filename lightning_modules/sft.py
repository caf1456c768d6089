"""Stage 1's fine-tuning: LoRA SFT of the LLM on the distilled trajectories (prompt tokens masked).

``python -m eagrl fit --config configs/tjh/sft.yaml --trainer.default_root_dir DIR`` trains on the
train patients' trajectories (``TrajectoryDataModule``), logs ``train/loss`` and ``val/loss`` (the val
patients' trajectories), and then, in the same command, answers the val and test patients with the
fine-tuned model (``val/auroc``, ``test/auroc``, ``test/parse_rate``, ... over ``limit_test_batches``).
At the end of fit it saves ``DIR/model/adapter`` (the LoRA adapter) and ``DIR/model/merged`` (base +
adapter merged, with the tokenizer: what stage 2 and evaluation load as ``backbone.name``).
Checkpoints hold only the trainable (LoRA) weights.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from eagrl.errors import EAGRLInputError
from eagrl.llm.generation import SamplingOptions
from eagrl.llm.sft import sft_batch, targets_over_limit
from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
from eagrl.optim import lr_factor
from eagrl.rl.rewards import RewardConfig
from lightning_modules.adapters import AdapterCheckpointing
from lightning_modules.answer_evaluation import AnswerEvaluator

log = logging.getLogger(__name__)


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the completion tokens (``labels != -100``).

    The same value as the model's own ``loss``, but the vocabulary projection runs only at the positions
    that are learnt: the prompt's logits ([B, L, V], 49,152 wide for SmolLM2) are never made, which is
    most of the memory of an SFT step on long EHR prompts.
    """
    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # [B, L, H]
    targets = batch["labels"][:, 1:]  # [B, L - 1]: the token each position predicts
    learnt = targets != -100  # [B, L - 1]
    logits = model.get_output_embeddings()(hidden[:, :-1][learnt])  # [N, V], N = completion tokens
    return torch.nn.functional.cross_entropy(logits.float(), targets[learnt])


def _default_backbone() -> BackboneOptions:
    return BackboneOptions(lora=LoraOptions(rank=4, alpha=8, dropout=0.05))


class SFTModule(AdapterCheckpointing, AnswerEvaluator):
    """LoRA SFT on distilled trajectories.

    Args:
        backbone: the LLM (LoRA options included; the paper's prototype: r 4, alpha 8).
        lr: AdamW learning rate (prototype: 2e-5).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_schedule: after the warm-up, ``constant`` or ``cosine`` (down to 0 at the last optimiser step).
        max_length: longest prompt + trajectory in tokens (None: no cut).
        sampling: generation settings of the answer evaluation after fit.
        scorer: how ŷ is read in that evaluation (``parse`` or ``token_probability``).
        answer_reading: where ``parse`` reads ŷ: ``final_answer``, only after the ``<Final Answer>`` tag the
            prompt asks for (no tag: unparsed); ``anywhere``, the older reading, also the last number of a
            completion without the tag, which a looping small model takes from the patient data it echoes.
        generation_batch_size: prompts per ``generate`` call in the evaluation.
        max_subquestions: the most sub-questions asked for in the prompt (as in stage 1).
        expert_attention: the expert export, for ``r_att`` in the evaluation (None: none).
        top_k: expert features per patient (None: the file's own top_k).
        reward: the combined reward's settings (evaluation only).
        truncate_visits: drop the oldest visits of a prompt longer than the context.
        unparsed_probability: ŷ used in AUROC/AUPRC for an unparseable answer.
        n_bootstrap: bootstrap resamples of the evaluation metrics.
        bootstrap_seed: their seed.
        progress_bar: a progress bar over patients in the evaluation.
        generations_file: file name of the evaluation's completions in the run directory.
        test_after_fit: answer the val/test patients right after fit.
        save_merged: also save the merged model (needs a second copy of the weights in memory).
    """

    style = "decomposition"

    def __init__(
        self,
        backbone: BackboneOptions = _default_backbone(),
        lr: PositiveFloat = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: NonNegativeInt = 10,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        max_length: Optional[PositiveInt] = None,
        sampling: SamplingOptions = SamplingOptions(max_new_tokens=256),
        scorer: Literal["parse", "token_probability"] = "parse",
        answer_reading: Literal["final_answer", "anywhere"] = "final_answer",
        generation_batch_size: PositiveInt = 8,
        max_subquestions: PositiveInt = 4,
        expert_attention: Optional[str] = None,
        top_k: Optional[PositiveInt] = None,
        reward: RewardConfig = RewardConfig(),
        truncate_visits: bool = True,
        unparsed_probability: float = 0.5,
        n_bootstrap: NonNegativeInt = 100,
        bootstrap_seed: int = 0,
        progress_bar: bool = True,
        generations_file: str = "generations.jsonl",
        test_after_fit: bool = True,
        save_merged: bool = True,
    ):
        super().__init__()
        if backbone.lora is None:
            raise EAGRLInputError("model.backbone.lora: SFT trains LoRA adapters; give lora options (rank, alpha, ...)")
        self.save_hyperparameters(ignore=["backbone", "sampling", "reward"])
        self.hparams.update(backbone=asdict(backbone), sampling=asdict(sampling), reward=asdict(reward))
        self.backbone_options, self.sampling, self.reward = backbone, sampling, reward
        self.test_after_fit = test_after_fit
        self.llm = None
        self.tokenizer = None
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def configure_model(self) -> None:
        if self.llm is None:
            self.llm, self.tokenizer = load_backbone(self.backbone_options)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule.cohort is None:
            datamodule.setup(stage)
        self.configure_model()
        self.setup_answers(list(datamodule.hparams.eval_splits))  # also the SFT prompt: stage 1's decomposition one
        if stage == "fit":
            self._check_target_lengths(datamodule)

    def _check_target_lengths(self, datamodule) -> None:
        """Warn when trajectories are longer than the evaluation's ``sampling.max_new_tokens``: the fine-tuned model
        would learn answers that the evaluation (and RL's rollouts at the same budget) cut off before ŷ."""
        budget = self.sampling.max_new_tokens
        counts = targets_over_limit(self.tokenizer, [e["trajectory"] for e in datamodule.examples["train"]], budget)
        if counts["over"]:
            log.warning(
                "%d of %d SFT trajectories (%.0f%%) are longer than model.sampling.max_new_tokens (%d; their median %d, "
                "longest %d tokens): answers in their form are cut off before <Final Answer> in the evaluation; raise "
                "max_new_tokens or shorten stage 1's steps (model.sampling of the distill config)",
                counts["over"], counts["targets"], 100 * counts["over"] / counts["targets"], budget, counts["median"], counts["longest"],
            )  # fmt: skip

    # ------------------------------------------------------------------------------------ training
    def _batch(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        datasets = self.trainer.datamodule.datasets
        prompts = [self.fit_prompt(datasets[e["split"]], int(e["index"]))[0] for e in examples]
        completions = [e["trajectory"] for e in examples]
        batch = sft_batch(self.tokenizer, prompts, completions, self.hparams.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def model_step(self, examples: list[dict[str, Any]]) -> torch.Tensor:
        batch = self._batch(examples)
        return completion_loss(self.llm, batch)

    def on_train_epoch_start(self) -> None:
        self.llm.train()  # from_pretrained returns eval mode: LoRA dropout and checkpointing need train mode

    def training_step(self, examples: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss = self.model_step(examples)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(examples), sync_dist=True)
        return loss

    def validation_step(self, examples: list[dict[str, Any]], batch_idx: int) -> None:
        self.log("val/loss", self.model_step(examples), on_step=False, on_epoch=True, batch_size=len(examples), sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        hp = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, hp.warmup_steps, hp.lr_schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
