"""Can stage 2 raise the reward of a policy that already writes the format? The tiny random Llama, warm-started on
the synthetic cohort, then EAG-RL (or any overlay) through the real CLI; prints the reward, R_att and strict-parse
trends (first 5 against last 5 rollouts, ``eagrl.evaluation.report.reward_trend``). Its defaults are the setting of the
slow test ``tests/unit/test_synthetic.py::test_rl_on_the_synthetic_cohort_raises_the_reward`` (README, synthetic cohort).

    python benchmarks/warm_start_rl.py --expert runs_cpu/synthetic/concare/expert_attention.jsonl --out runs_warm
        [--warm-steps 300] [--seed 0] [--rollouts 24] [--patients 16] [--lr 1e-3] [--lr-schedule cosine] [--temperature 0.3]
        [--kl-coef 0.1]
        [-- extra `python -m eagrl fit` arguments, e.g. --config configs/rl/grpo.yaml or --seed_everything 7]

The warm start trains all the tiny model's weights (AdamW 3e-3, 8 prompts a step) on the synthetic train patients'
decomposition prompts (the RL prompts) with a fixed answer that names two lab variables drawn at random and answers
0.5: a policy that writes the strict format and names features whatever the patient. (LoRA on the random tiny model
cannot learn the format: its tied 64-wide embeddings bound every logit.) RL then runs the RL module of
``configs/tjh/rl.yaml`` with the synthetic cohort and the smoke overlay: 64 balanced train patients, ``--patients`` a
rollout x G = 8, 4 optimiser steps a rollout, LoRA rank 8 on every projection, answers of at most 24 tokens,
sampling at ``--temperature``, a k3 KL penalty of ``--kl-coef`` to the warm start, ``--rollouts`` rollouts. The Triton
kernels are not interpreted (the loss's PyTorch path).

Measured on 2 cores (AMD EPYC, 2026-12-07; README, synthetic cohort): with the defaults the reward rose beyond 2 SE in
6 of 6 runs (z +4.5 to +13.3); without the KL term (``--kl-coef 0``) in 5 of 6, the sixth's policy drifting into lists
of names that the 24-token limit cut before the answer; with 4 patients a rollout and no KL term, at temperature 0.3
in 3 of 4 runs of this benchmark, at 0.5 in 5 of 6 (a scratch script and the earlier test).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def warm_start(folder: Path, steps: int = 300, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Train the tiny random Llama on the templated answers (see the module docstring); save it under ``folder``."""
    from datamodules import EHRDataModule
    from eagrl.data.synthetic import LAB_NAMES
    from eagrl.llm.prompts import PromptFitter
    from eagrl.llm.sft import sft_batch
    from eagrl.models.backbone import embedded_tokenizer, tiny_random_llama
    from lightning_modules.sft import completion_loss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    dm = EHRDataModule(dataset="synthetic", text_style="compact", max_visits=1, progress=False, cache_dir=cache_dir and str(cache_dir))
    dm.setup()
    tokenizer = embedded_tokenizer()
    fit = PromptFitter(tokenizer, 1800, dm.dataset, dm.question, "decomposition", 2, True)
    prompts = [fit(dm.datasets["train"], i)[0] for i in range(len(dm.datasets["train"]))]
    model = tiny_random_llama(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):  # loss 10.8 -> ~0.33 (the two names' draw is what is left)
        chosen = [rng.randrange(len(prompts)) for _ in range(8)]
        answers = [f"<Important Features> {', '.join(rng.sample(LAB_NAMES, 2))}\n<Final Answer> 0.5" for _ in chosen]
        loss = completion_loss(model, sft_batch(tokenizer, [prompts[i] for i in chosen], answers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"warm start step {step}: loss {float(loss.detach()):.3f}", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ANSWER_TOKENS = 24  # the longest answer, sampled in rollouts and greedy at test: the two names and the tags fit


def rl_arguments(
    start: Path, expert: Path, run: Path, rollouts: int = 24, patients: int = 16, lr: float = 1e-3, lr_schedule: str = "cosine",
    temperature: float = 0.3, kl_coef: float = 0.1,
) -> list[str]:
    """The ``python -m eagrl fit`` arguments of the RL run from the warm start ``start`` (the module docstring):
    ``rollouts`` rollouts of ``patients`` x G = 8 completions, 4 optimiser steps each, with a KL penalty of ``kl_coef`` to
    the warm start."""
    if patients < 1 or 64 % patients:
        raise ValueError(f"patients must divide the 64 train patients, got {patients}")
    per_epoch = 64 // patients
    if rollouts < 1 or rollouts % per_epoch:
        raise ValueError(f"rollouts must be a multiple of {per_epoch} (64 train patients, {patients} a rollout), got {rollouts}")
    return [
        "fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/synthetic/cohort.yaml", "--config", "configs/smoke/rl.yaml",
        "--model.init_args.backbone.name", str(Path(start).resolve()),
        "--model.init_args.backbone.lora.target_modules", "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "--model.init_args.expert_attention", str(Path(expert).resolve()), "--trainer.default_root_dir", str(Path(run).resolve()),
        "--trainer.max_epochs", str(rollouts // per_epoch), "--trainer.limit_train_batches", str(per_epoch),
        "--data.init_args.train_patients", "64", "--data.init_args.batch_size", str(patients),
        "--model.init_args.group_size", "8", "--model.init_args.rollout_batch_size", str(8 * patients),
        "--model.init_args.mini_batch_size", str(2 * patients),
        "--model.init_args.rollout_sampling.max_new_tokens", str(ANSWER_TOKENS), "--model.init_args.rollout_sampling.temperature", str(temperature),
        "--model.init_args.sampling.max_new_tokens", str(ANSWER_TOKENS), "--model.init_args.lr", str(lr), "--model.init_args.lr_schedule", lr_schedule,
        "--model.init_args.kl_coef", str(kl_coef),
    ]  # fmt: skip


def trends(run: Path) -> dict:
    """Rollouts and the first-5/last-5 trend (``reward_trend``) of the reward, R_att and the strict parse rate."""
    from eagrl.evaluation.report import _metrics_csv, reward_trend

    rows = _metrics_csv(Path(run))
    found = {name: reward_trend([float(r[f"train/{name}"]) for r in rows]) for name in ("reward", "r_att", "parse_rate")}
    return {"rollouts": len(rows), **found}


def main() -> None:
    default = {name: p.default for name, p in inspect.signature(rl_arguments).parameters.items()}  # one source of the defaults
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", type=Path, required=True, help="the synthetic ConCare run's expert_attention.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the warm start (start/) and the RL run (rl/)")
    parser.add_argument("--warm-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="the warm start's seed (the RL run's: --seed_everything after --)")
    parser.add_argument("--rollouts", type=int, default=default["rollouts"])
    parser.add_argument("--patients", type=int, default=default["patients"], help="patients a rollout (G = 8 completions each); 64 train patients")
    parser.add_argument("--lr", type=float, default=default["lr"], help="the RL learning rate")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=default["lr_schedule"])
    parser.add_argument("--temperature", type=float, default=default["temperature"], help="the rollouts' sampling temperature")
    parser.add_argument("--kl-coef", type=float, default=default["kl_coef"], help="β of the k3 KL penalty to the warm start (0: none)")
    args, extra = parser.parse_known_args()
    if not args.expert.is_file():
        raise SystemExit(f"error: --expert {args.expert} does not exist: run the synthetic ConCare stage first")
    start = warm_start(args.out / "start", args.warm_steps, args.seed)
    run = args.out / "rl"
    command = [sys.executable, "-m", "eagrl"]
    command += rl_arguments(
        start, args.expert, run, args.rollouts, args.patients, args.lr, args.lr_schedule, args.temperature, args.kl_coef
    )
    command += [a for a in extra if a != "--"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    subprocess.run(command, cwd=REPO, env=env, check=True)
    print(json.dumps(trends(run), indent=2))


if __name__ == "__main__":
    main()
