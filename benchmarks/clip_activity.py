"""Do the clips act? EAG-RL, its fixed-ε ablation, GRPO and DAPO updating the same real model on the same
real rollout batch, side by side in one run: clip fractions, the mean ratio and ε(τ)'s spread per variant.

    python benchmarks/clip_activity.py --model runs/tjh/sft/model/merged --expert runs/tjh/concare/expert_attention.jsonl
        [--group 8] [--new-tokens 48] [--mini-batch 2] [--lr 2e-3] [--patients 2]

One rollout batch: ``--patients`` TJH train patients (their last visit, decomposition prompt), G sampled
completions each from ``--model`` (default: the embedded SmolLM2-135M-Instruct), LoRA r 8 on q/k/v/o.
Every variant starts from the same LoRA weights and takes ``B / --mini-batch`` optimiser steps (AdamW,
``--lr``) on that batch, as ``eagrl.rl.step.optimise`` runs them in training:

- EAG-RL: ε(τ) in [0.2, 0.4], token-mean; R = 0.6 R_cls + 0.4 R_att;
- without ε(τ): ε_high = 0.2, token-mean; the same reward;
- GRPO: ε_high = 0.2, seq-mean-token-mean; R = R_cls;
- DAPO: ε_high = 0.28, token-mean; R = R_cls + the overlong penalty (L_c = L/4).

The reward reads ŷ anywhere in the completion (``parse_probability(anywhere=True)``, the last number without
the tag; no longer evaluation's reading, which needs the tag): at this model size the strict
reading of the reward path finds no ``<Final Answer>`` in a 48-token completion, so every reward would be
equal and no variant would update. This is a check of the update's mechanics on a real model and real
completions, not of learning. The output is one JSON with a row per variant, written to
``results/bench_clip_activity.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="a merged model folder, or the embedded SmolLM2")
    parser.add_argument("--expert", default="runs/tjh/concare/expert_attention.jsonl", help="the TJH ConCare export (R_att)")
    parser.add_argument("--group", type=int, default=8, help="G, completions per patient")
    parser.add_argument("--patients", type=int, default=2, help="train patients in the rollout batch")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--mini-batch", type=int, default=2, help="completions per optimiser step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from datamodules import EHRDataModule
    from eagrl.data.expert import load_expert_attention
    from eagrl.kernels import resolve_backend
    from eagrl.llm.generation import SamplingOptions, sample_groups
    from eagrl.llm.parsing import FeatureMatcher, parse_answer
    from eagrl.llm.prompts import build_prompt
    from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
    from eagrl.rl.grpo import Rollout, group_advantages
    from eagrl.rl.rewards import RewardConfig, combined_reward, overlong_penalty
    from eagrl.rl.rollout import key_token_mask
    from eagrl.rl.step import UpdateConfig, optimise

    torch.manual_seed(args.seed)
    lora = LoraOptions(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model, tokenizer = load_backbone(BackboneOptions(name=args.model, lora=lora))
    data = EHRDataModule(dataset="tjh", task="mortality", max_visits=1, progress=False)
    data.setup("fit")
    train = data.datasets["train"]
    positions = data.subset("train", args.patients)
    prompts = [build_prompt(tokenizer, train.text(i), "tjh", "mortality", "decomposition", 2) for i in positions]
    labels = [int(train.labels[i]) for i in positions]
    expert_top = load_expert_attention(args.expert, train.cohort.raw.feature_names, [train.ids[i] for i in positions])
    sampling = SamplingOptions(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0)
    groups = sample_groups(model, tokenizer, prompts, args.group, sampling, args.group)
    flat = [g for group in groups for g in group]
    matcher = FeatureMatcher(train.cohort.raw.feature_names)
    parsed = [parse_answer(g.text, matcher, anywhere=True) for g in flat]
    expanded = [y for y in labels for _ in range(args.group)]
    y_hat = [p.probability for p in parsed]
    features = [p.features for p in parsed]
    expert = [expert_top[train.ids[i]] for i in positions for _ in range(args.group)]

    def rollout(reward: torch.Tensor) -> Rollout:
        reward = reward.float()
        return Rollout(
            [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], [g.tokens or [tokenizer.eos_token_id] for g in flat],
            [g.text for g in flat], reward, reward, reward, torch.ones(len(flat), dtype=torch.bool),
            group_advantages(reward.view(len(prompts), args.group)).flatten(), [key_token_mask(tokenizer, g.tokens) for g in flat], args.group,
        )  # fmt: skip

    with_att = combined_reward(y_hat, expanded, features, expert, RewardConfig())["reward"]
    cls_only = combined_reward(y_hat, expanded, features, expert, RewardConfig(use_attention=False))["reward"]
    overlong = overlong_penalty([len(g.tokens) for g in flat], [g.finished for g in flat], args.new_tokens, max(args.new_tokens // 4, 1))
    backend = resolve_backend("auto", "cpu")
    variants = {
        "EAG-RL": (with_att, dict(adaptive_clip=True, loss_agg="token_mean")),
        "without ε(τ)": (with_att, dict(adaptive_clip=False, eps_high=0.2, loss_agg="token_mean")),
        "GRPO": (cls_only, dict(adaptive_clip=False, eps_high=0.2, loss_agg="seq_mean_token_mean")),
        "DAPO": (cls_only + overlong, dict(adaptive_clip=False, eps_high=0.28, loss_agg="token_mean")),
    }
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = {}
    for name, (reward, settings) in variants.items():
        policy = copy.deepcopy(model)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
        config = UpdateConfig(mini_batch_size=args.mini_batch, eps_low=0.2, eps_min=0.2, eps_max=0.4, backend=backend,
                              max_length=args.new_tokens, **settings)  # fmt: skip
        stats = optimise(policy, optimizer, rollout(reward), config)
        moved = torch.cat([(p.detach() - start[n]).flatten() for n, p in policy.named_parameters() if p.requires_grad])
        rows[name] = {k: round(float(stats[k]), 4) for k in ("steps", "ratio", "clip_high", "clip_low", "eps_high", "eps_high_min", "eps_high_max")}
        rows[name]["reward_std_within_groups"] = round(float(reward.view(len(prompts), args.group).std(dim=1).mean()), 4)
        rows[name]["weight_change_l2"] = round(float(moved.norm()), 5)
        print(name, rows[name], flush=True)
    out = {"settings": vars(args), "completions": len(flat), "lenient_parse_rate": sum(y is not None for y in y_hat) / len(flat),
           "strict_parse_rate": sum(p.strict_probability is not None for p in parsed) / len(flat), "variants": rows}  # fmt: skip
    path = REPO / "results" / "bench_clip_activity.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
