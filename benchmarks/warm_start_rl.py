"""Can stage 2 raise the reward of a policy that already writes the format? The tiny random Llama, warm-started on
the synthetic cohort, then EAG-RL (or any overlay) through the real CLI; prints the reward, R_att and strict-parse
trends (first 5 against last 5 rollouts, ``eagrl.evaluation.report.reward_trend``).

    python benchmarks/warm_start_rl.py --expert runs_cpu/synthetic/concare/expert_attention.jsonl --out runs_warm
        [--warm-steps 300] [--epochs 3] [--lr 3e-3] [-- extra `python -m eagrl fit` arguments, e.g. --config configs/rl/grpo.yaml]

The warm start trains all the tiny model's weights (AdamW 3e-3, 8 prompts a step) on the synthetic train patients'
decomposition prompts (the RL prompts) with a fixed answer that names two lab variables drawn at random and answers
0.5: a policy that writes the strict format and names features whatever the patient. (LoRA on the random tiny model
cannot learn the format: its tied 64-wide embeddings bound every logit.) RL then runs the RL module of
``configs/tjh/rl.yaml`` with the synthetic cohort and the smoke overlay: 64 balanced train patients, 4 a rollout x
G = 8, mini-batches of 8 (4 optimiser steps a rollout), LoRA rank 8 on every projection, temperature 0.7, answers of
at most 24 tokens, ``--epochs`` x 16 rollouts. The Triton kernels are not interpreted (the loss's PyTorch path).

Measured on 2 cores (AMD EPYC, 2026-12-07; README, synthetic cohort): R_att rose beyond 2 SE in 4 of 7 runs, the reward
in none, because the 1-6% of sampled completions that leave the format (each −2.8 against ~−0.4) cancel what naming
the expert's features gains (at most ~0.03).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def warm_start(folder: Path, steps: int, seed: int = 0) -> Path:
    """Train the tiny random Llama on the templated answers (see the module docstring); save it under ``folder``."""
    from datamodules import EHRDataModule
    from eagrl.data.synthetic import LAB_NAMES
    from eagrl.llm.prompts import PromptFitter
    from eagrl.llm.sft import sft_batch
    from eagrl.models.backbone import embedded_tokenizer, tiny_random_llama
    from lightning_modules.sft import completion_loss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    dm = EHRDataModule(dataset="synthetic", text_style="compact", max_visits=1, progress=False)
    dm.setup()
    tokenizer = embedded_tokenizer()
    fit = PromptFitter(tokenizer, 1800, dm.dataset, dm.question, "decomposition", 2, True)
    prompts = [fit(dm.datasets["train"], i)[0] for i in range(len(dm.datasets["train"]))]
    model = tiny_random_llama(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        chosen = [rng.randrange(len(prompts)) for _ in range(8)]
        answers = [f"<Important Features> {', '.join(rng.sample(LAB_NAMES, 2))}\n<Final Answer> 0.5" for _ in chosen]
        loss = completion_loss(model, sft_batch(tokenizer, [prompts[i] for i in chosen], answers))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"warm start step {step}: loss {float(loss.detach()):.3f}", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expert", type=Path, required=True, help="the synthetic ConCare run's expert_attention.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the warm start (start/) and the RL run (rl/)")
    parser.add_argument("--warm-steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3, help="16 rollouts each")
    parser.add_argument("--lr", type=float, default=3e-3, help="the RL learning rate")
    args, extra = parser.parse_known_args()
    if not args.expert.is_file():
        raise SystemExit(f"error: --expert {args.expert} does not exist: run the synthetic ConCare stage first")
    start = warm_start(args.out / "start", args.warm_steps)
    run = args.out / "rl"
    command = [
        sys.executable, "-m", "eagrl", "fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/synthetic/cohort.yaml",
        "--config", "configs/smoke/rl.yaml", "--model.init_args.backbone.name", str(start.resolve()),
        "--model.init_args.backbone.lora.target_modules", "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "--model.init_args.expert_attention", str(args.expert.resolve()), "--trainer.default_root_dir", str(run.resolve()),
        "--trainer.max_epochs", str(args.epochs), "--trainer.limit_train_batches", "16",
        "--data.init_args.train_patients", "64", "--data.init_args.batch_size", "4",
        "--model.init_args.group_size", "8", "--model.init_args.rollout_batch_size", "32", "--model.init_args.mini_batch_size", "8",
        "--model.init_args.rollout_sampling.max_new_tokens", "24", "--model.init_args.rollout_sampling.temperature", "0.7",
        "--model.init_args.sampling.max_new_tokens", "24", "--model.init_args.lr", str(args.lr), *[a for a in extra if a != "--"],
    ]  # fmt: skip
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    subprocess.run(command, cwd=REPO, env=env, check=True)

    from eagrl.evaluation.report import _metrics_csv, reward_trend

    rows = _metrics_csv(run)
    found = {name: reward_trend([float(r[f"train/{name}"]) for r in rows]) for name in ("reward", "r_att", "parse_rate")}
    print(json.dumps({"rollouts": len(rows), **found}, indent=2))


if __name__ == "__main__":
    main()
