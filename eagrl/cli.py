"""The ``python -m eagrl`` command line: LightningCLI (jsonargparse) with OmegaConf interpolation.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's) and ``summary`` (prints the
cohort sizes of the configured datamodule as JSON). Every run whose ``trainer.default_root_dir`` is
DIR leaves in DIR its resolved ``config.yaml``, ``run_info.json`` (seed, versions, git revision) and
``metrics.json`` (a flat JSON object of every metric logged, e.g. ``test/auroc``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from eagrl.callbacks import MetricsJsonWriter, RandomState, SaveRunBundle
from eagrl.distributed import check_scale_out
from eagrl.errors import EAGRLInputError
from eagrl.io import check_checkpoint, check_weights_only, last_checkpoints

# "omegaconf+" resolves ${...} after every config file and command-line value is merged, so
# `--trainer.default_root_dir DIR` also moves what a config derives from it; absolute paths in a
# file (``${trainer.default_root_dir}``) are read relative to the subcommand.
jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

SUMMARY_HELP = (
    "Print the cohort summary (features, patients, samples, positives per split, exclusions) as JSON, with the "
    "median, p90 and maximum prompt tokens per split for the configured text style (--tokenizer)."
)


class EAGRLArgumentParser(LightningArgumentParser):
    """Prints one error line (and where to find help) instead of the full usage block."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        noise = ("Subtypes: [", "Expected a <class 'NoneType'>", "Given value type:", "Does not validate against any")
        message = "\n".join(line for line in message.splitlines() if not any(n in line for n in noise))
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\n(run `{prog} --help` for the accepted options)\n")
        raise SystemExit(2)


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything nested in one) as plain dicts, lists and scalars."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


class EAGRLCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation, a run bundle in the run directory, and ``summary``."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunBundle,
            trainer_defaults={"callbacks": [MetricsJsonWriter(), RandomState()]},
            seed_everything_default=42,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            parser_class=EAGRLArgumentParser,
            parser_kwargs={"description": "EAG-RL: expert-attention-guided LLM reasoning over EHR.", "prog": "python -m eagrl"},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--wandb",
            choices=["offline", "online", "off"],
            default=os.environ.get("EAGRL_WANDB", "offline"),
            help="Weights & Biases logging: offline files under <run>/wandb (sync later with `wandb sync`), online, "
            "or off. Only the resolved config and aggregate metrics are logged, never patient text, ids or values.",
        )
        parser.add_argument("--wandb_project", default="eagrl", help="the W&B project of the run")

    def instantiate_classes(self) -> None:
        if self.subcommand not in (None, "summary"):
            check_scale_out(self.config[self.subcommand])  # before anything is built or launched
        self._instantiate()
        if self.subcommand in (None, "summary") or self.trainer is None:
            return
        config = self.config[self.subcommand]
        mode = config.get("wandb", "offline")
        if mode == "off" or os.environ.get("WANDB_MODE") == "disabled":
            return
        from lightning.pytorch.loggers import WandbLogger

        root = Path(self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(
            project=config.get("wandb_project", "eagrl"), name=root.name, save_dir=str(root), offline=mode == "offline", log_model=False
        )
        logger.log_hyperparams({"config": _plain(config)})  # a plain dict, not a Namespace
        self.trainer.loggers = [*self.trainer.loggers, logger]

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("parser_mode", "omegaconf+")
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch` is a typo, not `--trainer.max_epochs`
        return super().init_parser(**kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        summary = self.init_parser(description=SUMMARY_HELP)
        self.add_default_arguments_to_parser(summary)
        summary.add_lightning_class_args(self.trainer_class, "trainer")
        # a stage config may be passed as it is: its model section is accepted and ignored
        summary.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True, required=False)
        summary.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
        summary.add_argument(
            "--tokenizer",
            default="embedded",
            help="count prompt tokens with this tokenizer: 'embedded' (SmolLM2's, the default), a local model "
            "directory or hub id already in the cache, or 'none' (no counts)",
        )
        summary.add_argument(
            "--prompt_style", choices=["vanilla", "think", "decomposition"], default="decomposition", help="the prompt the counts are of"
        )
        self._subcommand_parsers["summary"] = summary
        self._subcommand_method_arguments["summary"] = []
        parser._subcommands_action.add_subcommand("summary", summary, help=SUMMARY_HELP)

    def _instantiate(self) -> None:
        if self.subcommand != "summary":
            super().instantiate_classes()
            return
        config = self.config["summary"].clone()
        config.pop("model", None)  # never build a (possibly large) model just to count patients
        self.config_init = self._subcommand_parsers["summary"].instantiate_classes(config)
        self.datamodule, self.model, self.trainer = self.config_init["data"], None, None

    def after_fit(self) -> None:
        """Evaluate the best checkpoint on val and test when the model asks for it (``test_after_fit``)."""
        if not getattr(self.model, "test_after_fit", False) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        if is_overridden("validation_step", self.model):
            self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if any(action.dest == "weights_only" for action in parser._actions):
            # checkpoints hold tensors and plain values only: never unpickle code from a checkpoint file
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads a checkpoint file's hyperparameters while parsing: check the file first."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            check_checkpoint(ckpt_path)
            check_weights_only(Path(ckpt_path))  # LightningCLI reads it with weights_only=True whatever is set
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "summary":
            out = self.datamodule.summary()
            config = self.config["summary"]
            if config.get("tokenizer", "embedded") != "none" and hasattr(self.datamodule, "prompt_tokens"):
                tokenizer = _summary_tokenizer(config["tokenizer"])
                out["prompt_tokens"] = {"tokenizer": config["tokenizer"], **self.datamodule.prompt_tokens(tokenizer, config["prompt_style"])}
            print(json.dumps(out))
            return
        if self.config_init[subcommand].get("ckpt_path") == "last":  # a file path was checked while parsing
            safe = self.config_init[subcommand].get("weights_only") is not False
            for path in last_checkpoints(self.trainer):  # truncated, damaged or code-carrying: reported, never loaded
                check_checkpoint(path)
                if safe:
                    check_weights_only(path)
        super()._run_subcommand(subcommand)


def _summary_tokenizer(name: str):
    """The tokenizer ``summary --tokenizer`` counts with: the embedded SmolLM2's, or a local/cached one."""
    from eagrl.models.backbone import embedded_tokenizer

    if name == "embedded":
        return embedded_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise EAGRLInputError(f"--tokenizer: could not load {name!r} ({' '.join(str(err).split())[:200]}); use 'embedded', a local model directory or 'none'") from None


def _reported(err: BaseException) -> BaseException | None:
    """The error behind ``err`` that is reported as one line: our ``EAGRLInputError`` (jsonargparse wraps
    errors raised in ``__init__``) or Lightning's refusal of a trainer setting (more GPUs than present)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (EAGRLInputError, MisconfigurationException)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        EAGRLCLI(args=args)
    except Exception as err:
        found = _reported(err)
        if found is None:
            raise
        prefix = "trainer: " if not isinstance(found, EAGRLInputError) else ""
        print(f"error: {prefix}{found}", file=sys.stderr)
        raise SystemExit(2) from None
