"""Prompting baselines (METHOD.md §6): Vanilla, Think-then-Answer and Question Decomposition, zero-shot.

``python -m eagrl test --config configs/tjh/prompting_vanilla.yaml --trainer.default_root_dir DIR``
prompts the backbone with every test patient, reads ŷ (parsed from the answer, or the yes/no token
probability), scores the named features against the expert's top-k, and logs ``test/auroc``,
``test/auprc`` (bootstrap), ``test/parse_rate`` (the lenient reading ŷ comes from), ``test/strict_parse_rate``
(the reward path's strict reading, ``eagrl.llm.parsing``), ``test/r_att``, ``test/r_cls``, ``test/reward`` and token
counts; the completions go to ``DIR/generations.jsonl`` (never to a logger).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal, Optional

from jsonargparse.typing import NonNegativeInt, PositiveInt

from eagrl.errors import EAGRLInputError
from eagrl.llm.generation import SamplingOptions
from eagrl.models.backbone import BackboneOptions, load_backbone
from eagrl.rl.rewards import RewardConfig
from lightning_modules.answer_evaluation import AnswerEvaluator


class PromptingModule(AnswerEvaluator):
    """A zero-shot prompting baseline (``test`` only).

    Args:
        style: ``vanilla`` (direct probability), ``think`` (Think-then-Answer) or ``decomposition``.
        backbone: which LLM and how to load it.
        sampling: generation settings (greedy by default).
        scorer: ``parse`` reads ŷ from the answer text; ``token_probability`` uses P(yes)/(P(yes)+P(no))
            after the completion and a yes/no cue (for small models that write no calibrated numbers).
        answer_reading: where ``parse`` reads ŷ: ``final_answer``, only after the ``<Final Answer>`` tag the
            prompt asks for (no tag: unparsed); ``anywhere``, the older reading, also the last number of a
            completion without the tag, which a looping small model takes from the patient data it echoes.
        generation_batch_size: prompts per ``generate`` call.
        max_subquestions: the most sub-questions asked for in the decomposition prompt.
        expert_attention: the ConCare run's ``expert_attention.jsonl`` (None: no alignment reward).
        top_k: expert features per patient (None: the file's own top_k).
        reward: the combined reward's settings.
        truncate_visits: drop the oldest visits of a prompt longer than the context (else: an error).
        unparsed_probability: ŷ used in AUROC/AUPRC for an unparseable answer.
        n_bootstrap: bootstrap resamples of the test metrics.
        bootstrap_seed: their seed.
        progress_bar: a progress bar over patients.
        generations_file: file name of the completions in the run directory.
    """

    def __init__(
        self,
        style: Literal["vanilla", "think", "decomposition"] = "vanilla",
        backbone: BackboneOptions = BackboneOptions(),
        sampling: SamplingOptions = SamplingOptions(max_new_tokens=32),
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
    ):
        super().__init__()
        if not 0.0 <= unparsed_probability <= 1.0:
            raise EAGRLInputError(f"model.unparsed_probability must be within [0, 1], got {unparsed_probability}")
        self.save_hyperparameters(ignore=["backbone", "sampling", "reward"])
        self.hparams.update(backbone=asdict(backbone), sampling=asdict(sampling), reward=asdict(reward))
        self.backbone_options, self.sampling, self.reward = backbone, sampling, reward
        self.llm = None
        self.tokenizer = None

    def configure_model(self) -> None:
        if self.llm is None:
            self.llm, self.tokenizer = load_backbone(self.backbone_options)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule.cohort is None:
            datamodule.setup(stage)
        self.configure_model()
        self.setup_answers(["test"])

    def configure_optimizers(self):  # a baseline: nothing to train
        return None
