"""The whole EAG-RL pipeline in one command (what ``make reproduce`` runs), stage by stage.

    python -m eagrl.pipeline [--profile cpu|quick|paper|smoke] [--runs runs] [--results results] [--model PATH]

Every stage is one ``python -m eagrl`` command (the same CLI a user runs) whose run directory lies at a
known path under ``--runs``; the next stages read its outputs from there. A stage whose outputs are newer
than its inputs and configs is skipped, so rerunning the command after an interruption resumes at the
first unfinished stage; a fit stopped inside its stage resumes from its run's ``checkpoints/last.ckpt`` where that
is newer than its inputs and configs (RL writes one after every rollout, ConCare and SFT after every epoch). Each run
folder records the command that made it (``pipeline_stage.json``): one made with other settings (another profile or
model) is neither done nor resumed, and moves to ``<runs>.replaced/<n>/`` when its stage runs. First
the mechanism check on the synthetic cohort (``eagrl.data.synthetic``: ConCare, Question Decomposition, stage 1, SFT,
GRPO and EAG-RL), then, in order, per dataset (TJH mortality, MIMIC-IV mortality, MIMIC-IV readmission):

 1. ``concare``      the expert (fit, then test) -> ``expert_attention.jsonl``
    ``concare_window``  the same under the observation window (mortality: TJH's first 2 days, MIMIC-IV's 48 h)
 2. ``prompting_*``  Vanilla, Think-then-Answer, Question Decomposition on the test patients -> ``metrics.json``,
                     ``generations.jsonl``
 3. ``distill``      stage 1's MCTS over the train and val patients (predict) -> ``trajectories.jsonl``
 4. ``sft``          LoRA SFT on them, then the test patients (fit) -> ``model/merged``
 5. ``rl_grpo``, ``rl_dapo``, ``rl``   GRPO, DAPO and EAG-RL from the SFT model, then the test patients (fit)
                     -> ``model/merged``, ``metrics.json``, RL curves in ``logs/``

then, on TJH, the ablations (``rl_no_stage1`` from the base model, ``rl_no_att``, ``rl_no_entropy``; "without
stage 2" is the SFT run), the robustness study (the base LLM and EAG-RL re-tested with 20/40/60/100% of the
feature order of the text shuffled: ``robust/<method>_<percent>``; ConCare is order-invariant), the cross-dataset
study (the MIMIC-IV mortality models tested on TJH: ``cross/<method>``), and finally the report
(``results/results.md``, ``results.json`` and the plots; ``eagrl.evaluation.report``). Stage times: the README.

Profiles:
- ``cpu`` (the default): SmolLM2-135M with the sizes of ``configs/reproduce/<stage>.yaml``: every LLM method of the
  main table on every test patient, stage 1 over every train and val patient (synthetic: 24 per split), SFT for an
  epoch over every kept trajectory, each RL variant to the same budget of generated tokens; the ablation, robustness
  and cross-dataset runs on one fixed balanced subset of 100 TJH test patients.
- ``quick``: a first look with the small sizes of ``configs/reproduce/quick/`` (6 test patients, 2 RL steps).
- ``paper``: the ``*_paper.yaml`` configs on a GPU with the 7B model given by ``--model`` (checked before any work).
- ``smoke``: the quick sizes and the tiny random model of ``configs/smoke/`` (the pipeline test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from eagrl.errors import EAGRLInputError
from eagrl.paths import REPO_ROOT

DATASETS = [  # (key, dataset folder, task override, run-name suffix)
    ("synthetic", "synthetic", None, ""),  # the mechanism check first (eagrl.data.synthetic): the main methods only
    ("tjh", "tjh", None, ""),
    ("mimic_iv_mortality", "mimic_iv", "mortality", "_mortality"),
    ("mimic_iv_readmission", "mimic_iv", "readmission", "_readmission"),
]
STYLES = ["vanilla", "think", "decomposition"]
RL_VARIANTS = {"rl_grpo": "configs/rl/grpo.yaml", "rl_dapo": "configs/rl/dapo.yaml", "rl": None}
ABLATIONS = {"rl_no_att": "configs/rl/no_attention_reward.yaml", "rl_no_entropy": "configs/rl/no_entropy_clip.yaml", "rl_no_stage1": None}
SHUFFLED = [20, 40, 60, 100]
SYNTHETIC_STAGES = {"concare", "prompting_decomposition", "distill", "sft", "rl_grpo", "rl"}
SUBSET = 100  # PROFILE=cpu: the fixed balanced subset of TJH test patients of the ablation, robustness and cross-dataset runs
SYNTHETIC_DISTILL_BATCHES = 3  # PROFILE=cpu: stage 1 on 3 batches of 8 synthetic patients per split (a mechanism check)
SYNTHETIC_TOKEN_BUDGET = 12000  # PROFILE=cpu: the synthetic RL variants' shared budget of generated tokens (TJH/MIMIC: the config's)


@dataclass
class Stage:
    """One CLI command with the files it reads and the files that say it is done."""

    name: str
    args: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)
    signature: list[str] = field(default_factory=list)  # args with the runs folder written "<runs>" (a moved one is the same)
    runs: Path = Path("runs")

    RECORD = "pipeline_stage.json"  # in the run folder: the signature of the command that made it

    @property
    def run_dir(self) -> Path:
        return Path(self.args[self.args.index("--trainer.default_root_dir") + 1])

    def recorded(self) -> Optional[list[str]]:
        """The signature of the command that made the run folder; None where none was recorded (a folder written
        before records existed, or none yet)."""
        try:
            return json.loads((self.run_dir / self.RECORD).read_text(encoding="utf-8"))["args"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def made_by_another_command(self) -> bool:
        """The run folder was made with other settings (another ``--profile``, ``--model`` or size): none of it
        counts for this stage, however recent (``make reproduce PROFILE=quick`` then ``make reproduce`` into one
        runs folder). A folder without a record is judged by the file times alone."""
        recorded = self.recorded()
        return recorded is not None and recorded != self.signature

    def prepare(self) -> Optional[Path]:
        """Before the stage runs: a run folder made by another command moves to ``<runs>.replaced/<n>/``, under its
        path in the runs folder (kept, outside it: the report reads every run under ``<runs>``, and this run's
        checkpoints, logs and outputs are not mixed with it); then this command's record is written. Returns where
        the folder went, if it moved."""
        run, moved = self.run_dir, self.retire()
        run.mkdir(parents=True, exist_ok=True)
        part = run / f".{self.RECORD}.part"
        part.write_text(json.dumps({"stage": self.name, "args": self.signature}, indent=1), encoding="utf-8")
        os.replace(part, run / self.RECORD)
        return moved

    def retire(self) -> Optional[Path]:
        """Move a run folder made by another command to ``<runs>.replaced/<n>/``, under its path in the runs folder;
        returns where it went (None: nothing to move)."""
        if not self.made_by_another_command():
            return None
        run, base = self.run_dir, Path(os.path.abspath(self.runs))  # not resolved: a linked run folder moves as the link
        n = 1
        while (target := base.with_name(f"{base.name}.replaced") / str(n) / Path(os.path.abspath(run)).relative_to(base)).exists():
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(str(run), str(target)))  # a rename, or a copy where the runs folder is on another disk

    def _newest_input(self) -> float:
        """The latest modification time of the stage's inputs and configs (0 when none exists)."""
        return max((p.stat().st_mtime for p in self.inputs + self.configs if p.exists()), default=0.0)

    def done(self) -> bool:
        if not all(p.exists() for p in self.outputs) or self.made_by_another_command():
            return False
        newest_input = self._newest_input()
        from eagrl.evaluation.readings import answer_reading_of  # here: the launcher itself never imports torch

        if any(answer_reading_of(p.parent) == "anywhere" for p in self.outputs if p.name == "metrics.json"):
            return False  # its test answers were read the older way: answered again, not reported
        return min(p.stat().st_mtime for p in self.outputs) >= newest_input

    def checkpoint(self) -> Optional[Path]:
        """The last checkpoint of a fit stage that stopped before its end, to resume from (``--ckpt_path``): its run's
        ``checkpoints/last.ckpt`` where that is newer than the stage's inputs and configs (an older one is another
        run's: the stage starts over); None for other stages, and for a run folder made by another command."""
        if self.args[0] != "fit" or "--trainer.default_root_dir" not in self.args or self.made_by_another_command():
            return None
        last = Path(self.args[self.args.index("--trainer.default_root_dir") + 1]) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None
        newest_input = self._newest_input()
        return last if last.stat().st_mtime >= newest_input else None

    def command(self) -> list[str]:
        """The CLI arguments that run the stage: ``args``, resuming from ``checkpoint()`` where there is one."""
        resume = self.checkpoint()
        return [*self.args, "--ckpt_path", str(resume)] if resume is not None else list(self.args)


class Plan:
    """The ordered stages of a profile (see the module docstring)."""

    def __init__(self, profile: str, runs: Path, model: Optional[str] = None, seeds: tuple[int, ...] = (0,)):
        self.profile, self.runs, self.model, self.seeds = profile, runs, model, seeds
        self.stages: list[Stage] = []
        self.producer: dict[Path, str] = {}
        for key, folder, task, suffix in DATASETS:
            self._dataset(key, folder, task, suffix)
        self._ablations()
        self._robustness()
        self._cross_dataset()

    # -------------------------------------------------------------------------------- helpers
    def _config(self, folder: str, stage: str) -> list[str]:
        """``--config`` arguments of a stage: its dataset config, then the profile's overlays (the synthetic cohort:
        the TJH config with ``configs/synthetic/cohort.yaml`` on top)."""
        cohort = "tjh" if folder == "synthetic" else folder
        paper = self.profile == "paper" and (REPO_ROOT / f"configs/{cohort}/{stage}_paper.yaml").is_file()
        files = [f"configs/{cohort}/{stage}_paper.yaml" if paper else f"configs/{cohort}/{stage}.yaml"]
        if folder == "synthetic":
            files.append("configs/synthetic/cohort.yaml")
        kind = stage.split("_")[0] if not stage.startswith("concare") else "concare"
        sizes = "configs/reproduce/quick" if self.profile in ("quick", "smoke") else "configs/reproduce"
        if self.profile in ("cpu", "quick", "smoke") and (REPO_ROOT / f"{sizes}/{kind}.yaml").is_file():
            files.append(f"{sizes}/{kind}.yaml")
        if self.profile == "smoke":
            files.append(f"configs/smoke/{kind}.yaml")
        return [a for f in files for a in ("--config", f)]

    def _llm(self) -> list[str]:
        """The base LLM: the embedded SmolLM2 (cpu), the user's model (paper) or the tiny one (smoke overlays)."""
        if self.profile == "paper":  # the paper's per-visit text, whatever a CPU-sized config chose
            return ["--model.init_args.backbone.name", str(self.model), "--data.init_args.text_style", "paper"]
        return []

    def _add(self, name: str, args: list[str], outputs: list[Path], inputs: list[Path]) -> None:
        configs = [REPO_ROOT / a for a in args[1:] if a.endswith(".yaml")]
        runs = str(self.runs)
        signature = ["<runs>" + a[len(runs):] if a == runs or a.startswith(runs + os.sep) else a for a in args]
        self.stages.append(Stage(name, args, outputs, inputs, configs, signature, self.runs))
        for path in outputs:
            self.producer[path] = name

    def _subset(self) -> list[str]:
        """The ablation, robustness and cross-dataset runs' test patients: PROFILE=cpu, one fixed balanced subset."""
        return ["--data.init_args.eval_patients", str(SUBSET)] if self.profile == "cpu" else []

    def _dataset(self, key: str, folder: str, task: Optional[str], suffix: str) -> None:
        runs = self.runs / folder
        synthetic = folder == "synthetic"
        wanted = (lambda name: name in SYNTHETIC_STAGES) if synthetic else (lambda name: True)
        task_args = ["--data.init_args.task", task] if task else []
        concare = runs / f"concare{suffix}"
        concare_config = "concare" if folder in ("tjh", "synthetic") else f"concare_{task}"
        expert = concare / "expert_attention.jsonl"
        self._add(
            f"{key}/concare",
            ["fit", *self._config(folder, concare_config), "--trainer.default_root_dir", str(concare)],
            [expert, concare / "metrics.json"], [],
        )  # fmt: skip
        if task != "readmission" and not synthetic:  # ConCare under the observation window, beside the whole stay (readmission: whole stay)
            window = runs / f"concare_window{suffix}"
            overlay = ["--config", "configs/windows/tjh_2days.yaml" if folder == "tjh" else "configs/windows/mimic_iv_48h.yaml"]
            self._add(
                f"{key}/concare_window",
                ["fit", *self._config(folder, concare_config), *overlay, "--trainer.default_root_dir", str(window)],
                [window / "metrics.json", window / "expert_attention.jsonl"], [],  # metrics.json is written at every validation: the export, after the test
            )  # fmt: skip
        for style in [s for s in STYLES if wanted(f"prompting_{s}")]:
            run = runs / f"prompting_{style}{suffix}"
            self._add(
                f"{key}/prompting_{style}",
                ["test", *self._config(folder, f"prompting_{style}"), *task_args, *self._llm(),
                 "--model.init_args.expert_attention", str(expert), "--trainer.default_root_dir", str(run)],
                [run / "metrics.json"], [expert],
            )  # fmt: skip
        distill, sft = runs / f"distill{suffix}", runs / f"sft{suffix}"
        trajectories = distill / "trajectories.jsonl"
        small = ["--trainer.limit_predict_batches", str(SYNTHETIC_DISTILL_BATCHES)] if synthetic and self.profile == "cpu" else []
        self._add(
            f"{key}/distill",
            ["predict", *self._config(folder, "distill"), *small, *task_args, *self._llm(),
             "--model.init_args.expert_attention", str(expert), "--trainer.default_root_dir", str(distill)],
            [trajectories, distill / "metrics.json"], [expert],  # metrics.json is written at the end: a half-run is not done
        )  # fmt: skip
        merged = sft / "model" / "merged"
        self._add(
            f"{key}/sft",
            ["fit", *self._config(folder, "sft"), *task_args, *self._llm(), "--data.init_args.trajectories", str(trajectories),
             "--model.init_args.expert_attention", str(expert), "--trainer.default_root_dir", str(sft)],
            [sft / "metrics.json", merged / "config.json"], [trajectories, expert],
        )  # fmt: skip
        for name, overlay in RL_VARIANTS.items():
            if wanted(name):
                budget = ["--model.init_args.max_generated_tokens", str(SYNTHETIC_TOKEN_BUDGET)] if synthetic and self.profile == "cpu" else []
                self._rl(key, folder, suffix, task_args, name, overlay, str(merged), [merged / "config.json"], expert, budget)
                for seed in [s for s in self.seeds if s != self.seeds[0]]:  # SEEDS="0 1": the seed noise of the RL variants
                    self._rl(key, folder, f"{suffix}_seed{seed}", task_args, name, overlay, str(merged), [merged / "config.json"], expert,
                             [*budget, "--seed_everything", str(seed)])  # fmt: skip

    def _rl(self, key, folder, suffix, task_args, name, overlay, start: str, start_files, expert, extra_args: Optional[list[str]] = None) -> None:
        run = self.runs / folder / f"{name}{suffix}"
        extra = (["--config", overlay] if overlay else []) + (extra_args or [])
        config = self._config(folder, "rl")
        self._add(
            f"{key}/{name}{suffix}" if "_seed" in suffix else f"{key}/{name}",
            ["fit", *config, *extra, *task_args, "--model.init_args.backbone.name", start,
             "--model.init_args.expert_attention", str(expert), "--trainer.default_root_dir", str(run)],
            [run / "metrics.json", run / "model" / "merged" / "config.json"], [*start_files, expert],
        )  # fmt: skip

    def _ablations(self) -> None:
        expert = self.runs / "tjh" / "concare" / "expert_attention.jsonl"
        merged = self.runs / "tjh" / "sft" / "model" / "merged"
        for name, overlay in ABLATIONS.items():
            if name == "rl_no_stage1":  # RL straight from the base model
                base = self.model if self.profile == "paper" else ("tiny-random-llama" if self.profile == "smoke" else "embedded:smollm2-135m-instruct")
                self._rl("tjh", "tjh", "", [], name, None, str(base), [], expert, self._subset())
            else:
                self._rl("tjh", "tjh", "", [], name, overlay, str(merged), [merged / "config.json"], expert, self._subset())

    def _test_with(self, name: str, folder: str, config_stage: str, backbone: Optional[str], inputs: list[Path], run: Path, extra: list[str]) -> None:
        model = ["--model.init_args.backbone.name", backbone] if backbone else self._llm()
        self._add(name, ["test", *self._config(folder, config_stage), *model, *extra, "--trainer.default_root_dir", str(run)], [run / "metrics.json"], inputs)

    def _robustness(self) -> None:
        runs = self.runs / "tjh"
        expert = runs / "concare" / "expert_attention.jsonl"
        for percent in SHUFFLED:  # the LLMs only: ConCare is order-invariant by construction (one GRU per feature)
            shuffle = ["--data.init_args.shuffle_fraction", str(percent / 100), *self._subset()]
            with_expert = [*shuffle, "--model.init_args.expert_attention", str(expert)]
            self._test_with(f"tjh/robust/prompting_decomposition_{percent}", "tjh", "prompting_decomposition", None, [expert],
                            runs / "robust" / f"prompting_decomposition_{percent}", with_expert)  # fmt: skip
            merged = runs / "rl" / "model" / "merged"
            self._test_with(f"tjh/robust/rl_{percent}", "tjh", "prompting_decomposition", str(merged), [merged / "config.json", expert],
                            runs / "robust" / f"rl_{percent}", with_expert)  # fmt: skip

    def _cross_dataset(self) -> None:
        expert = self.runs / "tjh" / "concare" / "expert_attention.jsonl"
        for name in ("prompting_decomposition", "sft", "rl"):
            merged = self.runs / "mimic_iv" / f"{name}_mortality" / "model" / "merged"
            backbone = None if name.startswith("prompting") else str(merged)
            inputs = [expert] if backbone is None else [merged / "config.json", expert]
            self._test_with(f"cross/{name}", "tjh", "prompting_decomposition", backbone, inputs, self.runs / "cross" / name,
                            ["--model.init_args.expert_attention", str(expert), *self._subset()])  # fmt: skip


def runs_folder(runs: Path) -> Path:
    """``--runs`` as the stages see it: they run in the repository root, so a relative folder given from elsewhere is
    made absolute (else the stages would write under the repository and the pipeline look under the current folder);
    from the root it stays relative, so the printed commands stay short."""
    if runs.is_absolute():
        return runs.resolve()
    return runs if Path.cwd().resolve() == REPO_ROOT.resolve() else Path.cwd().resolve() / runs


def check_profile(profile: str, model: Optional[str]) -> None:
    """``paper`` needs a CUDA GPU and the model's weights: stop before any work otherwise."""
    if profile != "paper":
        return
    import torch

    if not torch.cuda.is_available():
        raise EAGRLInputError("PROFILE=paper needs a CUDA GPU (a 7B model); use PROFILE=cpu on this machine")
    if not model:
        raise EAGRLInputError("PROFILE=paper needs the model: make reproduce PROFILE=paper MODEL=/path/to/Qwen2.5-7B-Instruct")
    if not Path(model).expanduser().is_dir():
        raise EAGRLInputError(f"MODEL={model} is not a folder with the model's weights (config.json, *.safetensors)")


def select_stages(stages: list[Stage], only: Optional[str]) -> list[Stage]:
    """``--only``: the stage of that exact name (``tjh/rl`` is EAG-RL alone, not every ``tjh/rl_*``), else every stage
    whose name starts with it (``tjh/``, ``tjh/robust``)."""
    if only is None:
        return list(stages)
    exact = [s for s in stages if s.name == only]
    chosen = exact or [s for s in stages if s.name.startswith(only)]
    if not chosen:
        raise EAGRLInputError(f"--only {only}: no stage is named so or has a name that starts with it (--list shows the stages)")
    return chosen


def run(plan: Plan, in_process: bool = False, only: Optional[str] = None) -> list[str]:
    """Run the plan's stages in order, skipping finished ones; returns the names of the stages run."""
    ran = []
    stages = select_stages(plan.stages, only)
    started = time.perf_counter()
    by_name = {s.name: s for s in plan.stages}
    for k, stage in enumerate(stages, start=1):
        prefix = f"[{k}/{len(stages)}] {stage.name}"
        if stage.done():
            print(f"{prefix}: up to date, skipped", flush=True)
            continue
        missing = [(p, "") for p in stage.inputs if not p.exists()]
        missing += [(p, " with this profile's settings (its run folder was made with others)")
                    for p in stage.inputs if p in plan.producer and by_name[plan.producer[p]].made_by_another_command()]  # fmt: skip
        if missing:
            path, why = missing[0]
            made_by = plan.producer.get(path, "an earlier stage")
            raise EAGRLInputError(
                f"stage {stage.name} needs {path}, which stage {made_by} makes{why}: run it first "
                f"(python -m eagrl.pipeline --profile {plan.profile} --runs {plan.runs} --only {made_by})"
            )
        args = stage.command()
        moved = stage.prepare()
        if moved is not None:
            print(f"{prefix}: its run folder was made with other settings; moved to {moved}", flush=True)
        command = [sys.executable, "-m", "eagrl", *args]
        print(f"{prefix}: {shlex.join(['python', '-m', 'eagrl', *args])}", flush=True)
        begin = time.perf_counter()
        if in_process:
            _run_in_process(stage.name, args)
        else:
            returncode, stopped_by = run_stage(command)
            if stopped_by is not None:
                raise SystemExit(f"error: stage {stage.name} stopped by {signal.Signals(stopped_by).name} (sent to the pipeline); rerun the same command to resume")
            if returncode != 0:
                raise SystemExit(f"error: stage {stage.name} failed (exit {returncode}); fix it and rerun the same command to resume")
        ran.append(stage.name)
        print(f"{prefix}: done in {time.perf_counter() - begin:.0f} s ({(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
    return ran


def run_stage(command: list[str], grace_s: float = 30.0) -> tuple[int, Optional[int]]:
    """Run one stage's command; returns its exit code and the signal that stopped the pipeline meanwhile (else None).

    A SIGTERM or SIGHUP to the pipeline (``kill``, ``timeout``, a closed terminal; not one the pipeline ignores, as
    under ``nohup``) is passed on to the stage, which gets ``grace_s`` seconds to stop before it is killed. A Ctrl-C
    reaches both (one process group): the pipeline stops with KeyboardInterrupt once the stage has, after the same
    grace at most. A Lightning fit stops after its current batch (an RL rollout on a CPU can take longer than the
    grace); Lightning's predict loop, the stage-1 search, ignores SIGTERM; a SIGHUP ends a stage at once. A fit resumes
    from its last checkpoint, stage 1 skips its finished patients, a test stage starts over. Without this the stage
    would go on writing into its run folder after the pipeline ended, beside the stage a rerun starts there.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        return subprocess.Popen(command, cwd=REPO_ROOT).wait(), None
    received: list[tuple[int, float]] = []  # (signal, when)
    child: Optional[subprocess.Popen] = None

    def forward(signum, frame):
        received.append((signum, time.monotonic()))
        if child is not None:
            child.send_signal(signum)

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None and signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, forward) for s in wanted}  # before the child starts: no signal falls between
    try:
        child = subprocess.Popen(command, cwd=REPO_ROOT)
        if received:  # arrived while the child was starting
            child.send_signal(received[0][0])
        while child.poll() is None:
            if received and time.monotonic() - received[0][1] > grace_s:
                child.kill()
                child.wait()
            time.sleep(0.2)
    except KeyboardInterrupt:
        if child is not None:
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    return child.returncode, (received[0][0] if received else None)


def retire_other_seeds(plan: Plan) -> list[Path]:
    """Before the report: the extra-seed run folders (``<variant>_seed<N>``) of seeds this plan does not run, which
    another command made (``PROFILE=quick SEEDS="0 1"``, then ``make reproduce``), move aside as ``Stage.prepare``
    moves the plan's own: the report reads every seed folder under the runs folder. Returns where they went."""
    found = {int(m.group(1)) for p in plan.runs.glob("*/*_seed*") if (m := re.search(r"_seed(\d+)$", p.name))}
    extra = sorted(found - set(plan.seeds))
    if not extra:
        return []
    wider = Plan(plan.profile, plan.runs, plan.model, (*plan.seeds, *extra))
    return [moved for stage in wider.stages if (moved := stage.retire()) is not None]


def _run_in_process(name: str, args: list[str]) -> None:
    from eagrl.cli import main

    try:
        main(list(args))
    except SystemExit as stop:
        if stop.code:
            raise SystemExit(f"error: stage {name} failed (exit {stop.code})") from None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--profile", choices=["cpu", "quick", "paper", "smoke"], default=os.environ.get("PROFILE", "cpu"))
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the run directories go")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where results.md/json and the plots go")
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="PROFILE=paper: the 7B model's folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[int(x) for x in os.environ.get("SEEDS", "0").split()],
                        help="seeds of the RL variants (SEEDS=\"0 1\"): the first is the main run, each other one runs every "
                        "variant again as <variant>_seed<N>, beside it in the report")
    parser.add_argument("--only", default=None, help="run only this stage (e.g. tjh/rl: EAG-RL alone), or, where no stage has this name, every stage whose "
                        "name starts with it (e.g. tjh/ or tjh/robust)")
    parser.add_argument("--list", action="store_true", help="print the stages and whether each is up to date")
    parser.add_argument("--in-process", action="store_true", help="run stages in this process (tests)")
    args = parser.parse_args(argv)
    try:
        check_profile(args.profile, args.model)
        plan = Plan(args.profile, runs_folder(args.runs), args.model, tuple(args.seeds))
        if args.list:
            for stage in plan.stages:
                state = "done " if stage.done() else "to do"
                resume = "" if state == "done " or stage.checkpoint() is None else "  (resumes from its checkpoints/last.ckpt)"
                other = "  (its run folder was made with other settings: moved aside when it runs)" if stage.made_by_another_command() else ""
                print(f"{state}  {stage.name}{resume}{other}")
            return
        run(plan, in_process=args.in_process, only=args.only)
    except EAGRLInputError as err:
        raise SystemExit(f"error: {err}") from None
    if args.only is None:
        from eagrl.evaluation.report import build

        for moved in retire_other_seeds(plan):
            print(f"a run folder made with other settings moved to {moved} (not reported)", flush=True)

        results = build(args.runs, args.results)
        print(f"wrote {args.results / 'results.md'}, {args.results / 'results.json'} and {len(results['plots'])} plots")


if __name__ == "__main__":
    main()
