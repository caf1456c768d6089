"""The ``python -m eagrl`` command line: LightningCLI (jsonargparse) with OmegaConf interpolation.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (Lightning's) and ``summary`` (prints the
cohort sizes of the configured datamodule as JSON). Every run whose ``trainer.default_root_dir`` is
DIR leaves in DIR its resolved ``config.yaml``, ``run_info.json`` (seed, versions, git revision) and
``metrics.json`` (a flat JSON object of every metric logged, e.g. ``test/auroc``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from eagrl.errors import EAGRLInputError
from eagrl.io import check_checkpoint, write_json_atomic, write_text_atomic
from eagrl.paths import REPO_ROOT

# "omegaconf+" resolves ${...} after every config file and command-line value is merged, so
# `--trainer.default_root_dir DIR` also moves what a config derives from it; absolute paths in a
# file (``${trainer.default_root_dir}``) are read relative to the subcommand.
jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

SUMMARY_HELP = (
    "Print the cohort summary (features, patients, samples, positives per split, exclusions) as JSON, with the "
    "median, p90 and maximum prompt tokens per split for the configured text style (--tokenizer)."
)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("eagrl", "torch", "lightning", "transformers", "peft", "torchmetrics", "numpy", "pandas"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


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


class SaveRunBundle(SaveConfigCallback):
    """Write the resolved ``config.yaml`` and ``run_info.json`` into ``trainer.default_root_dir``.

    They are written when the stage starts, after the data, the model and the expert file were read: a
    run that stops on bad input leaves an earlier run's files in that directory as they were.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any):
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, **kwargs)
        self._stage: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self._stage = stage

    def _save_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved or self._stage is None:
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, self._stage)
        self.already_saved = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_once(trainer, pl_module)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        text = self.parser.dump(self.config, skip_none=False)
        write_text_atomic(root / self.config_filename, text)
        write_json_atomic(
            root / "run_info.json",
            {
                "stage": stage,
                "seed": self.config.get("seed_everything"),
                "command": sys.argv[1:2],
                "git_revision": _git_revision(),
                "versions": _versions(),
            },
        )


class MetricsJsonWriter(L.Callback):
    """Keep ``<default_root_dir>/metrics.json`` up to date with every metric logged so far.

    Metrics of earlier stages of the same run directory (e.g. ``fit`` then ``test``) are kept; a
    metric logged again replaces its old value. The file is replaced atomically.
    """

    filename = "metrics.json"

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        path = Path(trainer.default_root_dir) / self.filename
        metrics: dict[str, float] = {}
        if path.is_file():
            try:
                metrics = json.loads(path.read_text())
            except ValueError:
                metrics = {}
        for name, value in trainer.callback_metrics.items():
            number = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            metrics[name] = number if math.isfinite(number) else None
        metrics.update(getattr(trainer.datamodule, "input_report", None) or {})  # an external cohort: absent features, units
        info = getattr(pl_module, "generation_info", None) if pl_module is not None else None
        if info:  # how an LLM stage generated: dtype (and how it was chosen), prefill chunk, cache, batch size
            metrics["generation"] = info
        write_json_atomic(path, dict(sorted(metrics.items())))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "generation_info", None):  # stage 1 logs no metric; its generation settings are kept
            self._write(trainer, pl_module)


class RandomState(L.Callback):
    """Keep the torch, CUDA, numpy and Python random states in every checkpoint and restore them on resume.

    A run resumed from an epoch-end checkpoint then draws the same shuffles, dropout masks and samples
    as the run that was not interrupted. Stored as tensors and plain values, so a checkpoint still loads
    with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        from eagrl.distributed import gather_objects

        kind, keys, position, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        mine = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next],
        }
        return {"ranks": gather_objects(mine)}  # every rank's own state (each rank samples differently)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np

        from eagrl.distributed import rank

        ranks = state.get("ranks", [state])
        state = ranks[rank()] if rank() < len(ranks) else ranks[0]  # resumed on more ranks: the rest start from rank 0's
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _last_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The files ``--ckpt_path last`` may load: every ``last*.ckpt`` of the checkpoint folders."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    return sorted(p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt") if p.is_file())


# Which stages run under which family of Lightning strategies (README: "Running on a cluster").
STRATEGY_SUPPORT = {
    "single": None,  # every stage
    "ddp": None,  # every stage: ddp, ddp_spawn, ddp_fork, DDPStrategy(...)
    "fsdp": ("SFTModule",),  # shards a large backbone under LoRA; RL sums its LoRA gradients itself (DDP only)
}


def _strategy_family(strategy: Any) -> str:
    """``single``, ``ddp``, ``fsdp`` or the name given, from a strategy string or a class_path config."""
    if strategy is None:
        return "single"
    name = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else strategy)
    name = str(name).rsplit(".", 1)[-1].lower().replace("strategy", "")
    if name in ("auto", "single_device", "singledevice", "single_xla"):
        return "single"
    for family in ("fsdp", "ddp"):
        if name.startswith(family):
            return family
    return name


def check_scale_out(config: Any) -> None:
    """Refuse, before any work, a strategy a stage does not support, QLoRA under FSDP, more CPU processes
    than cores, and a fixed training subset that the world size does not divide."""
    trainer, model, data = config.get("trainer"), config.get("model"), config.get("data")
    stage = str(getattr(model, "class_path", "") or "").rsplit(".", 1)[-1]
    family = _strategy_family(trainer.get("strategy"))
    if family not in STRATEGY_SUPPORT or (STRATEGY_SUPPORT[family] is not None and stage not in STRATEGY_SUPPORT[family]):
        supported = ", ".join(f for f, stages in STRATEGY_SUPPORT.items() if stages is None or stage in stages)
        raise EAGRLInputError(f"trainer.strategy: {stage or 'this stage'} does not run under {family!r}; it supports: {supported}")
    args = getattr(model, "init_args", None) or {}
    backbone = args.get("backbone") if hasattr(args, "get") else None
    if family == "fsdp" and backbone is not None and getattr(backbone, "quantization", None) == "nf4":
        raise EAGRLInputError("model.backbone.quantization: nf4 (QLoRA) runs with DDP only, not FSDP: use strategy ddp, or quantization none")
    if family == "fsdp" and hasattr(args, "get") and args.get("save_merged", True):
        raise EAGRLInputError("model.save_merged: the merged export needs the whole backbone on one GPU; under FSDP set it false (configs/scale/sft_fsdp.yaml)")
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes") or 1)
    accelerator = str(trainer.get("accelerator") or "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 1 and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        cores = os.cpu_count() or 1
        if devices > cores:
            raise EAGRLInputError(f"trainer.devices: {devices} processes asked for, this machine has {cores} CPU cores")
    world = devices * nodes if isinstance(devices, int) and devices > 0 else None
    data_args = getattr(data, "init_args", None) or {}
    train_patients = data_args.get("train_patients") if hasattr(data_args, "get") else None
    if world and world > 1 and train_patients and train_patients % world:
        raise EAGRLInputError(
            f"data.train_patients: {train_patients} patients do not split evenly over {world} processes "
            f"(devices {devices} x num_nodes {nodes}); use a multiple of {world}"
        )


def _check_weights_only(path: Path) -> None:
    """Refuse a checkpoint that holds anything but tensors and plain values (unpickling it could run code)."""
    import pickle

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):
            raise EAGRLInputError(
                f"checkpoint {path} holds objects other than tensors and plain values, so it was not loaded "
                f"(torch.load(weights_only=True): {first}). Pass --weights_only false only for a file you trust"
            ) from None
        raise EAGRLInputError(f"checkpoint {path} is not a PyTorch checkpoint that can be read ({first})") from None


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
            _check_weights_only(Path(ckpt_path))  # LightningCLI reads it with weights_only=True whatever is set
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
            for path in _last_checkpoints(self.trainer):  # truncated, damaged or code-carrying: reported, never loaded
                check_checkpoint(path)
                if safe:
                    _check_weights_only(path)
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
