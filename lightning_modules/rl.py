"""Stage 2: attention-aligned policy optimisation (METHOD.md §4), and the GRPO/DAPO baselines and the
ablations as configurations of the same module.

``python -m eagrl fit --config configs/tjh/rl.yaml --trainer.default_root_dir DIR`` starts from the
stage-1 model (``backbone.name``: the SFT run's ``model/merged``, or ``init_adapter``: its LoRA adapter on
the base) and runs, per training step (manual optimisation):

1. rollout: G sampled completions of each prompt of the batch (train patients), each prompt prefilled
   once and its cache shared by the group (``sample_groups``);
2. scoring: the combined reward (R_cls from the strictly parsed ``<Final Answer>``, R_att of the named
   features against the expert's top-k), DAPO's overlong shaping when on, group-normalised advantages.
   DAPO's dynamic sampling drops groups whose rewards are all equal and samples more patients until the
   batch is full again, for at most ``resample_rounds`` extra rounds (``train/resample_rounds``);
3. the update (``eagrl.rl.step.optimise``): the rollout policy's log-probs and key-token entropies (so
   ε(τ)) from one no-grad pass, then ``ppo_epochs`` passes over mini-batches of ``mini_batch_size``
   completions, one optimiser step each, so the ratios leave 1 and the clips act: per prompt the
   completions' logits with the prompt computed once, the fused log-prob/entropy op and the clipped
   surrogate aggregated by ``loss_agg`` (``policy_loss``, optionally under ``torch.compile(fullgraph=True)``),
   gradient clipping; the learning-rate schedule steps once per rollout.

EAG-RL's upper clip ε(τ) comes from each trajectory's mean entropy over its ``<Important Features>``
tokens (all its tokens when the span is missing), detached and min-max normalised over the rollout batch
into [ε_min, ε_max]; ε_low is fixed. The optional KL penalty to the stage-1 policy uses the same model with
its LoRA adapter disabled (no second copy): the stage-1 model is merged into the base first.

Logged per step (``train/``): reward, r_cls, r_att, parse_rate (strict), entropy, key_entropy, eps_high,
eps_high_min, eps_high_max, clip_low, clip_high, ratio, kl, completion_length, groups_varied (the share of the
rollout's groups, before any resampling, whose G rewards are not all equal: the others have zero advantage, so the
reward teaches them nothing; near 0, every completion scores alike: one answer for all, or none parsed),
resample_rounds, steps (optimiser steps), lr, loss, grad_norm, step_time (seconds).
After fit, with ``test_after_fit``, the trained policy answers the test patients (``test/auroc``, ...).
Checkpoints hold the LoRA weights, the optimiser, the tokens generated and (``eagrl.callbacks.RandomState``, which the CLI
adds) the random state; the configs write one after every rollout, and ``--ckpt_path last`` resumes from it as if the fit
had not stopped (the epoch's patients already trained on are skipped: ``datamodules.sampling``; a checkpoint of the
rollout that spent the budget goes straight to the test). A resumed fit logs into the next ``logs/version_<N>``; the report
joins them (a kill in the milliseconds between a rollout's checkpoint and its logged row loses that row from the curve).
The end of fit writes ``model/adapter`` and ``model/merged``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from eagrl.distributed import all_reduce
from eagrl.errors import EAGRLInputError
from eagrl.io import check_safetensors
from eagrl.kernels import resolve_backend
from eagrl.kernels.fused_linear import fused_linear_policy_loss
from eagrl.llm.generation import SamplingOptions, sample_groups
from eagrl.llm.parsing import parse_answer
from eagrl.models.backbone import EMBEDDED, TINY, BackboneOptions, LoraOptions, add_lora, load_backbone
from eagrl.optim import lr_factor
from eagrl.rl.grpo import LOSS_AGGREGATIONS, Rollout, group_advantages, keep_varied_groups, policy_loss
from eagrl.rl.rewards import RewardConfig, combined_reward, overlong_penalty
from eagrl.rl.rollout import key_token_mask
from eagrl.rl.step import UpdateConfig, optimise
from lightning_modules.adapters import AdapterCheckpointing
from lightning_modules.answer_evaluation import AnswerEvaluator


log = logging.getLogger(__name__)


def _quiet_expected_warnings() -> None:
    """Two warnings this module's design sets off on purpose, silenced when a fit sets up (not at import, so
    they hold wherever the fit runs, also after a caller resets the warning filters)."""
    # post-step checkpoints are what resuming wants; Lightning warns about them with manual optimisation
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # the schedule steps once per rollout, also after a rollout with no update (every group's rewards equal)
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


def loss_path(loss_backend: str, device: torch.device | str) -> dict[str, Any]:
    """``UpdateConfig``'s ``backend`` and ``fused_linear`` for the ``loss_backend`` option on ``device`` (see
    ``RLModule``): ``auto`` is ``fused_linear`` on a CPU and ``triton`` on a CUDA GPU."""
    if loss_backend == "auto":
        loss_backend = "triton" if torch.device(device).type == "cuda" else "fused_linear"
    if loss_backend == "fused_linear":
        return {"backend": resolve_backend("auto", device), "fused_linear": True}
    return {"backend": resolve_backend(loss_backend, device), "fused_linear": False}


def _default_backbone() -> BackboneOptions:
    return BackboneOptions(lora=LoraOptions(rank=8, alpha=16, dropout=0.0))


def _check_local(name: str, key: str) -> None:
    """A starting model/adapter given as a path must exist (a hub id cannot be fetched offline either)."""
    if name.lower() in (TINY, EMBEDDED) or name.startswith("embedded:"):
        return
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or path.parts[0] == "runs"
    if looks_local and not path.exists():
        raise EAGRLInputError(
            f"{key}: {name} does not exist: stage 2 starts from the stage-1 model; run the SFT config first "
            "(python -m eagrl fit --config configs/<dataset>/sft.yaml), or point it at its model/merged folder"
        )


class RLModule(AdapterCheckpointing, AnswerEvaluator):
    """GRPO-style RL of the LLM with the expert-guided reward (see the module docstring).

    Args:
        backbone: the starting policy (the SFT run's ``model/merged``) and the LoRA trained on it (its
            dropout must be 0: dropout on in the loss and off in sampling makes the ratios noise).
        init_adapter: instead, a LoRA adapter folder (the SFT run's ``model/adapter``) merged into
            ``backbone.name`` first, so the stage-1 policy is the KL reference; a fresh LoRA is trained on it.
        group_size: G, completions per prompt (>= 2).
        ppo_epochs: passes over the rollout batch's mini-batches.
        mini_batch_size: completions per optimiser step (verl's ``ppo_mini_batch_size``); the rollout batch
            (batch size x G completions) is cut into mini-batches of this size. None: one step per pass.
        lr: AdamW learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (global L2 norm).
        eps_low: the fixed lower clip ε_low.
        eps_high: the fixed upper clip when ``adaptive_clip`` is off (GRPO 0.2, DAPO's clip-higher 0.28).
        adaptive_clip: EAG-RL's ε(τ) from the key-token entropy, in [eps_min, eps_max].
        eps_min: lower end of ε(τ).
        eps_max: upper end of ε(τ).
        loss_agg: ``token_mean`` (DAPO; [ours] the default for EAG-RL), ``seq_mean_token_mean`` (the original
            GRPO) or ``seq_mean_token_sum_norm`` (Dr. GRPO), over each mini-batch.
        lr_schedule: ``constant`` or ``cosine`` (to 0 at the last rollout), after the warm-up.
        warmup_steps: rollouts of linear learning-rate warm-up from 0.
        dynamic_sampling: drop groups whose rewards are all equal and refill the batch (DAPO).
        resample_rounds: the most extra rounds of sampling that dynamic sampling runs to refill a batch.
        max_generated_tokens: stop fitting once the rollouts have generated this many completion tokens in all
            (every rank, every epoch, DAPO's resampling included), so variants compared at one budget have had the
            same sampling work; None: stop at ``trainer.max_epochs``/``max_steps`` only. ``train/generated_tokens``
            logs the running total.
        overlong_shaping: DAPO's overlong reward shaping (``eagrl.rl.rewards.overlong_penalty``).
        overlong_buffer: its buffer L_c in tokens (None: a quarter of ``rollout_sampling.max_new_tokens``).
        kl_coef: β_KL of a k3 KL penalty to the stage-1 policy (adapter disabled); 0 turns it off.
        rollout_sampling: sampling of the rollouts (temperature also divides the logits in the loss). top-p,
            top-k and a repetition penalty are refused: they sample from another distribution than the
            policy the loss differentiates.
        rollout_batch_size: sequences per ``generate`` call in the rollouts.
        rollout_seed: when set, each patient's group is sampled in its own ``generate`` calls under a seed
            made of this value, the step and the patient id: the rollouts no longer depend on which patients
            share a batch or a rank, so an N-process run gives the 1-process run's updates (at some cost in
            batching). None: one random stream for the whole batch (fastest).
        loss_backend: ``fused_linear`` (the loss from the final hidden states in chunks of rows, never holding the
            completion logits: ``eagrl.kernels.fused_linear``; Triton kernels per chunk where they run, else
            PyTorch), ``triton`` or ``torch`` (the logits, then the fused op's Triton kernel or its PyTorch
            reference), or ``auto``: ``fused_linear`` on a CPU (there 0.33x the time and 0.08x the peak memory of
            the logits path: the README's "Kernel" figures), ``triton`` on a CUDA GPU (the fused linear loss has no
            GPU figures yet).
        compile_loss: run the loss under ``torch.compile(fullgraph=True, dynamic=True)``.
        sampling: generation settings of the answer evaluation after fit (greedy by default).
        scorer: how ŷ is read in that evaluation (``parse`` or ``token_probability``).
        answer_reading: where ``parse`` reads ŷ: ``final_answer``, only after the ``<Final Answer>`` tag the
            prompt asks for (no tag: unparsed); ``anywhere``, the older reading, also the last number of a
            completion without the tag, which a looping small model takes from the patient data it echoes.
        generation_batch_size: prompts per ``generate`` call in the evaluation.
        max_subquestions: the most sub-questions asked for in the prompt (as in stage 1).
        expert_attention: the expert export (``expert_attention.jsonl``): R_att needs it.
        top_k: expert features per patient (None: the file's own top_k).
        reward: the combined reward (``use_attention: false`` is R_cls only: GRPO, DAPO, "without R_att").
        truncate_visits: drop the oldest visits of a prompt longer than the context.
        unparsed_probability: ŷ used in AUROC/AUPRC for an unparseable answer.
        n_bootstrap: bootstrap resamples of the evaluation metrics.
        bootstrap_seed: their seed.
        progress_bar: a progress bar over patients in the evaluation.
        generations_file: file name of the evaluation's completions in the run directory.
        test_after_fit: answer the test patients right after fit.
        save_merged: also save the merged model at the end of fit.
    """

    style = "decomposition"

    def __init__(
        self,
        backbone: BackboneOptions = _default_backbone(),
        init_adapter: Optional[str] = None,
        group_size: int = 8,
        ppo_epochs: PositiveInt = 1,
        mini_batch_size: Optional[PositiveInt] = None,
        loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean",
        lr: PositiveFloat = 1e-5,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        warmup_steps: NonNegativeInt = 0,
        weight_decay: NonNegativeFloat = 0.0,
        max_grad_norm: PositiveFloat = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        adaptive_clip: bool = True,
        eps_min: float = 0.2,
        eps_max: float = 0.4,
        dynamic_sampling: bool = False,
        resample_rounds: NonNegativeInt = 3,
        max_generated_tokens: Optional[PositiveInt] = None,
        overlong_shaping: bool = False,
        overlong_buffer: Optional[PositiveInt] = None,
        kl_coef: NonNegativeFloat = 0.0,
        rollout_sampling: SamplingOptions = SamplingOptions(max_new_tokens=256, do_sample=True, temperature=1.0),
        rollout_batch_size: PositiveInt = 8,
        rollout_seed: Optional[int] = None,
        loss_backend: Literal["auto", "fused_linear", "triton", "torch"] = "auto",
        compile_loss: bool = False,
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
        if group_size < 2:
            raise EAGRLInputError(f"model.group_size must be >= 2 (advantages are normalised within a group), got {group_size}")
        if not 0.0 < eps_low < 1.0:
            raise EAGRLInputError(f"model.eps_low must be within (0, 1), got {eps_low}")
        if eps_high <= 0 or eps_min <= 0:
            raise EAGRLInputError(f"model.eps_high and model.eps_min must be > 0, got {eps_high} and {eps_min}")
        if loss_agg not in LOSS_AGGREGATIONS:
            raise EAGRLInputError(f"model.loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
        changed = {
            "top_p": rollout_sampling.top_p != 1.0, "top_k": rollout_sampling.top_k != 0, "repetition_penalty": rollout_sampling.repetition_penalty != 1.0,
        }  # fmt: skip
        if any(changed.values()):
            names = ", ".join(f"model.rollout_sampling.{k}" for k, v in changed.items() if v)
            raise EAGRLInputError(
                f"{names}: RL rollouts must sample from the policy the loss differentiates; top-p, top-k and a repetition "
                "penalty sample from another distribution, so the ratios and entropies would be wrong (leave top_p 1, "
                "top_k 0, repetition_penalty 1; the temperature is carried into the loss)"
            )
        if overlong_buffer is not None and overlong_buffer > rollout_sampling.max_new_tokens:
            raise EAGRLInputError(
                f"model.overlong_buffer ({overlong_buffer}) must not exceed model.rollout_sampling.max_new_tokens ({rollout_sampling.max_new_tokens})"
            )
        if eps_min > eps_max:
            raise EAGRLInputError(f"model.eps_min ({eps_min}) must not exceed model.eps_max ({eps_max})")
        if not rollout_sampling.do_sample:
            raise EAGRLInputError("model.rollout_sampling.do_sample must be true: a group of greedy completions has no variance")
        if backbone.lora is None:
            raise EAGRLInputError("model.backbone.lora: RL trains LoRA adapters; give lora options")
        if backbone.lora.dropout != 0:
            raise EAGRLInputError(
                f"model.backbone.lora.dropout must be 0 in RL, got {backbone.lora.dropout}: dropout is on in the loss and off "
                "in sampling, so the ratios and entropies would be noise"
            )
        if backbone.gradient_checkpointing:
            raise EAGRLInputError(
                "model.backbone.gradient_checkpointing: RL's shared-prompt forward reuses the prompt's KV cache, "
                "which checkpointing turns off; set it false"
            )
        _check_local(backbone.name, "model.backbone.name")
        if init_adapter is not None:
            _check_local(init_adapter, "model.init_adapter")
            for weights in sorted(Path(init_adapter).expanduser().glob("*.safetensors")):
                check_safetensors(weights, "model.init_adapter")  # cut short: reported, not half-loaded (the backbone's are checked as it loads)
        if reward.use_attention and not expert_attention:
            raise EAGRLInputError("model.expert_attention: the reward uses R_att (reward.use_attention true) and needs the expert export")
        self.save_hyperparameters(ignore=["backbone", "sampling", "rollout_sampling", "reward"])
        self.hparams.update(
            backbone=asdict(backbone), sampling=asdict(sampling), rollout_sampling=asdict(rollout_sampling), reward=asdict(reward)
        )
        self.backbone_options, self.sampling, self.rollout_sampling, self.reward = backbone, sampling, rollout_sampling, reward
        self.test_after_fit = test_after_fit
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.llm = None
        self.tokenizer = None
        self._loss = torch.compile(policy_loss, fullgraph=True, dynamic=True) if compile_loss else policy_loss
        self._linear_loss = torch.compile(fused_linear_policy_loss, fullgraph=True, dynamic=True) if compile_loss else fused_linear_policy_loss
        self.generated_tokens = 0  # completion tokens sampled so far by every rank (saved in checkpoints)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["eagrl_generated_tokens"] = self.generated_tokens  # the token budget resumes where it was

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.generated_tokens = int(checkpoint.get("eagrl_generated_tokens", 0))

    def on_train_start(self) -> None:
        budget = self.hparams.max_generated_tokens
        if budget is not None and self.generated_tokens >= budget:  # resumed from the checkpoint of the last rollout
            log.info("RL: the checkpoint had spent the budget (%d of %d completion tokens): no rollout is left", self.generated_tokens, budget)
            self.trainer.should_stop = True

    # --------------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        if self.llm is not None:
            return
        if self.hparams.init_adapter is None:
            self.llm, self.tokenizer = load_backbone(self.backbone_options)
            return
        from peft import PeftModel

        # the stage-1 adapter merged into the base (so its dropout never acts and it is the KL reference),
        # then a fresh LoRA on top
        base, self.tokenizer = load_backbone(BackboneOptions(**{**asdict(self.backbone_options), "lora": None}))
        stage1 = PeftModel.from_pretrained(base, self.hparams.init_adapter, is_trainable=False).merge_and_unload()
        self.llm = add_lora(stage1, self.backbone_options.lora)

    def setup(self, stage: str) -> None:
        _quiet_expected_warnings()
        datamodule = self.trainer.datamodule
        if datamodule.cohort is None:
            datamodule.setup(stage)
        self.configure_model()
        hp = self.hparams
        self.update_config = UpdateConfig(
            ppo_epochs=hp.ppo_epochs,
            mini_batch_size=hp.mini_batch_size,
            loss_agg=hp.loss_agg,
            max_length=self.rollout_sampling.max_new_tokens,
            eps_low=hp.eps_low,
            eps_high=hp.eps_high,
            adaptive_clip=hp.adaptive_clip,
            eps_min=hp.eps_min,
            eps_max=hp.eps_max,
            kl_coef=hp.kl_coef,
            max_grad_norm=hp.max_grad_norm,
            temperature=self.rollout_sampling.temperature,
            **loss_path(hp.loss_backend, self.trainer.strategy.root_device),  # a forced path that cannot run fails here
        )
        fused = "fused linear loss with the %s kernels" if self.update_config.fused_linear else "%s path"
        log.info("RL loss: the " + fused + "%s", self.update_config.backend, " under torch.compile" if hp.compile_loss else "")
        completions = datamodule.batch_size * hp.group_size
        steps = math.ceil(completions / (hp.mini_batch_size or completions)) * hp.ppo_epochs
        if steps < 2:
            log.warning(
                "RL: one optimiser step per rollout batch (%d completions, mini_batch_size %s, ppo_epochs %d): every ratio "
                "is 1, so no clip acts and ε(τ) changes nothing; set model.mini_batch_size below the batch", completions, hp.mini_batch_size, hp.ppo_epochs,
            )
        longest = max(self.sampling.max_new_tokens, self.rollout_sampling.max_new_tokens)
        self.setup_answers(["train", "test"], max_new_tokens=longest)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)  # rollouts
        schedule = lambda step: lr_factor(step, total, self.hparams.warmup_steps, self.hparams.lr_schedule)  # noqa: E731
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}}

    @property
    def generation_info(self) -> dict[str, Any]:
        """What ``metrics.json`` records under ``generation`` (the rollouts' batch size and token budget too)."""
        budget = {"generated_tokens": self.generated_tokens, "max_generated_tokens": self.hparams.max_generated_tokens}
        return {**super().generation_info, "rollout_batch_size": self.hparams.rollout_batch_size, "rollouts": budget}

    # ------------------------------------------------------------------------------------- rollout
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample G completions per patient of ``batch`` and score them."""
        data = self.trainer.datamodule.datasets[batch["split"][0]]
        return self._rollout(data, [int(i) for i in batch["index"]], [str(i) for i in batch["id"]], batch["label"].long().tolist())

    def _rollout(self, data, positions: list[int], ids: list[str], labels: list[int]) -> Rollout:
        """G completions of each patient (``positions`` in ``data``), scored: the strict reward, DAPO's overlong
        shaping when on, group-normalised advantages."""
        group = self.hparams.group_size
        prompts = [self.fit_prompt(data, i)[0] for i in positions]
        seed, size = self.hparams.rollout_seed, self.hparams.rollout_batch_size
        if seed is None:
            groups = sample_groups(self.llm, self.tokenizer, prompts, group, self.rollout_sampling, size, self.engine, True)
        else:
            groups = []
            for prompt, sample in zip(prompts, ids):
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(zlib.crc32(f"{seed}:{self.global_step}:{sample}".encode()))
                    groups += sample_groups(self.llm, self.tokenizer, [prompt], group, self.rollout_sampling, size, self.engine, True)
        flat = [g for grp in groups for g in grp]
        for g in flat:  # a completion needs one token to be learnt from
            if not g.tokens:
                g.tokens = [self.tokenizer.eos_token_id]
        parsed = [parse_answer(g.text, self.matcher) for g in flat]
        expanded = [int(y) for y in labels for _ in range(group)]
        expert = [self.expert[i] if self.expert else [] for i in ids for _ in range(group)]
        scores = combined_reward(
            [p.strict_probability for p in parsed], expanded, [p.features for p in parsed], expert, self.reward,
            [p.unknown_features for p in parsed],
        )  # fmt: skip
        reward = scores["reward"].float()
        if self.hparams.overlong_shaping:
            limit = self.rollout_sampling.max_new_tokens
            buffer = self.hparams.overlong_buffer or max(limit // 4, 1)
            reward = reward + overlong_penalty([len(g.tokens) for g in flat], [g.finished for g in flat], limit, buffer).float()
        return Rollout(
            prompt_ids=[self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
            completions=[g.tokens for g in flat],
            texts=[g.text for g in flat],
            rewards=reward,
            r_cls=scores["r_cls"].float(),
            r_att=scores["r_att"].float(),
            parsed=scores["parsed"],
            advantages=group_advantages(reward.view(len(prompts), group)).flatten(),  # [B]
            key_mask=[key_token_mask(self.tokenizer, g.tokens) for g in flat],
            group_size=group,
            sampler_logp=[g.logprobs or [] for g in flat],
        )

    def refill(self, rollout: Rollout, batch: dict[str, Any]) -> tuple[Rollout, int]:
        """DAPO's dynamic sampling: keep the groups whose rewards are not all equal, and sample more train
        patients (never one already tried this step) until the batch holds as many groups as it started
        with, for at most ``resample_rounds`` extra rounds. Returns the rollout and the rounds run."""
        wanted, group = len(rollout.prompt_ids), self.hparams.group_size
        kept = rollout.select_groups(keep_varied_groups(rollout.rewards.view(wanted, group)))
        split = batch["split"][0]
        data = self.trainer.datamodule.datasets[split]
        pool = self.trainer.datamodule.train_subset() if self.trainer.datamodule.hparams.train_patients else list(range(len(data)))
        tried = {int(i) for i in batch["index"]}
        generator = torch.Generator().manual_seed(zlib.crc32(f"refill:{self.global_step}:{self.global_rank}".encode()))
        rounds, self._refill_tokens = 0, 0
        while len(kept.prompt_ids) < wanted and rounds < self.hparams.resample_rounds:
            fresh = [pool[k] for k in torch.randperm(len(pool), generator=generator).tolist() if pool[k] not in tried]
            fresh = fresh[: wanted - len(kept.prompt_ids)]
            if not fresh:
                break
            rounds += 1
            tried.update(fresh)
            labels = [int(data.labels[i]) for i in fresh]
            extra = self._rollout(data, fresh, [data.ids[i] for i in fresh], labels)
            self._refill_tokens += extra.n_tokens  # sampled, whether kept or not: counted against the budget
            kept = Rollout.concat([kept, extra.select_groups(keep_varied_groups(extra.rewards.view(len(fresh), group)))])
        return kept, rounds

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        group = self.hparams.group_size
        rollout = self.rollout(batch)
        n_groups = len(rollout.prompt_ids)
        # means over the batch of every rank (sums and counts reduced together)
        sums = torch.tensor(
            [float(rollout.rewards.sum()), float(rollout.r_cls.sum()), float(rollout.r_att.sum()), float(rollout.parsed.float().sum()),
             float(rollout.n_tokens), float(len(rollout.completions)), float(n_groups)], dtype=torch.float64, device=self.device,
        )  # fmt: skip
        rounds, self._refill_tokens = 0, 0
        # groups whose G rewards are not all equal: only these have a non-zero advantage, so a gradient (every variant)
        varied = int(keep_varied_groups(rollout.rewards.view(n_groups, group)).sum())
        if self.hparams.dynamic_sampling:
            rollout, rounds = self.refill(rollout, batch)
        extra = [float(len(rollout.prompt_ids)), float(varied), float(rounds), float(self._refill_tokens)]
        sums = all_reduce(torch.cat([sums, sums.new_tensor(extra)])).tolist()
        reward, r_cls, r_att, parsed, tokens, completions, groups, kept, first, rounds_sum, refill_tokens = sums
        self.generated_tokens += int(tokens + refill_tokens)  # the same on every rank (reduced sums)
        logged = {
            "reward": reward / completions, "r_cls": r_cls / completions, "r_att": r_att / completions,
            "parse_rate": parsed / completions, "completion_length": tokens / completions, "groups_varied": first / groups,
            "resample_rounds": rounds_sum / max(self.trainer.world_size, 1),
        }  # fmt: skip
        if kept > 0:  # 0 only under DAPO, when every group of every rank had equal rewards: nothing to learn (the same on all ranks)
            # gradients are summed by the update itself (its loss is a share of the global token mean), not by DDP
            block = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
            with block():
                logged.update(optimise(self.llm, self.optimizers(), rollout, self.update_config, self.manual_backward, self._loss, self._linear_loss))
        logged["lr"] = self.optimizers().param_groups[0]["lr"]
        self.lr_schedulers().step()  # once per rollout
        logged["step_time"] = time.perf_counter() - start
        logged["generated_tokens"] = self.generated_tokens
        budget = self.hparams.max_generated_tokens
        if budget is not None and self.generated_tokens >= budget:
            log.info("RL: %d completion tokens generated, the budget of %d is spent: stopping", self.generated_tokens, budget)
            self.trainer.should_stop = True
        size = len(batch["id"])
        self.log_dict({f"train/{k}": float(v) for k, v in logged.items()}, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/reward_epoch", logged["reward"], on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
