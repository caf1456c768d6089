"""One RL step of ours against TRL's ``GRPOTrainer`` on the same model, prompt, group size and lengths,
on CPU: time per step and peak memory, side by side in one run.

    pip install trl==1.16.0        # the peer; not a dependency of eagrl
    python benchmarks/rl_step.py [--dataset mimic_iv] [--visits 1 3] [--text-style paper] [--group 4] [--new-tokens 128] [--steps 3]

Both sides: the embedded SmolLM2-135M-Instruct in fp32, LoRA r 8 / alpha 16 on q/k/v/o, the first train
patient's decomposition prompt (``--visits`` sets how many visits it shows and ``--text-style`` how they
are written, hence its length: paper-style MIMIC-IV demo prompts are ~0.6-1.5k tokens, TJH ones ~1.9k with
one visit; compact ones are shorter), G sampled
completions of exactly ``--new-tokens`` tokens (end-of-text suppressed before), the classification
reward, β_KL = 0, one optimisation pass per rollout, AdamW lr 1e-5. A step is rollout + reward + update.
Each side runs in its own process (so its peak RSS is its own); the time is the median step after the
first (warm-up) one, the memory the process's peak RSS (VmHWM) over all steps.
``--gradient-checkpointing`` turns it on for TRL (ours cannot: its shared-prompt forward needs the cache).
Results go to ``results/bench_rl_step_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _peak_rss_gib() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 2**20


def _prompt(dataset: str, visits: int, style: str = "paper"):
    """(chat-templated prompt, label) of the first train patient of ``dataset``, showing ``visits`` visits."""
    from datamodules import EHRDataModule
    from eagrl.llm.prompts import build_prompt
    from eagrl.models.backbone import embedded_tokenizer, BackboneOptions

    data = EHRDataModule(dataset=dataset, task="mortality", max_visits=visits)
    data.setup("fit")
    train = data.datasets["train"]
    tokenizer = embedded_tokenizer(BackboneOptions())
    text = train.text(0, style=style) if style != "paper" else train.text(0)  # (older versions know one style)
    prompt = build_prompt(tokenizer, text, dataset, "mortality", "decomposition", 2)
    return prompt, int(train[0]["label"])


def _reward(texts: list[str], label: int) -> list[float]:
    from eagrl.llm.parsing import parse_probability
    from eagrl.rl.rewards import RewardConfig, classification_reward

    found = [parse_probability(t, anywhere=True) for t in texts]  # the last number anywhere: rewards that vary (see clip_activity)
    return classification_reward(found, [label] * len(texts), RewardConfig(use_attention=False)).tolist()


def run_ours(args) -> dict:
    import torch

    from eagrl.llm.generation import SamplingOptions, sample_groups
    from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
    from eagrl.rl.grpo import Rollout, group_advantages
    from eagrl.rl.rollout import key_token_mask
    from eagrl.rl.step import UpdateConfig, optimise

    prompt, label = _prompt(args.dataset, args.visits, args.text_style)
    lora = LoraOptions(rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=0.0, target_modules=LORA["target_modules"])
    model, tokenizer = load_backbone(BackboneOptions(dtype="float32", lora=lora))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sampling = SamplingOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0)
    from eagrl.kernels import resolve_backend

    # one optimiser step per rollout, as TRL's GRPOTrainer at its defaults, so both do the same work
    config = UpdateConfig(adaptive_clip=True, backend=resolve_backend("auto", model.device))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    times, rewards = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        group = sample_groups(model, tokenizer, [prompt], args.group, sampling, args.group)[0]
        reward = torch.tensor(_reward([g.text for g in group], label))
        rollout = Rollout(
            [prompt_ids], [g.tokens for g in group], [g.text for g in group], reward, reward, torch.zeros_like(reward),
            torch.ones(args.group, dtype=torch.bool), group_advantages(reward.view(1, -1)).flatten(),
            [key_token_mask(tokenizer, g.tokens) for g in group], args.group,
        )  # fmt: skip
        optimise(model, optimizer, rollout, config)
        times.append(time.perf_counter() - start)
        rewards.append(float(reward.mean()))
    return {"prompt_tokens": len(prompt_ids), "step_s": times, "completion_tokens": [len(g.tokens) for g in group]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from eagrl.models.backbone import BackboneOptions, load_backbone
    from eagrl.paths import cache_dir

    load_backbone(BackboneOptions())  # converts the embedded GGUF once (cached)
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    prompt, label = _prompt(args.dataset, args.visits, args.text_style)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    def reward(prompts, completions, **kwargs):
        return _reward(list(completions), label)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.group, num_generations=args.group, max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, beta=0.0, num_iterations=1, learning_rate=1e-5,
            max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=args.gradient_checkpointing, model_init_kwargs={"dtype": torch.float32}, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        dataset = Dataset.from_dict({"prompt": [prompt] * (args.steps * args.group)})
        trainer = GRPOTrainer(
            model=str(folder), reward_funcs=reward, args=config, train_dataset=dataset, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
            callbacks=[StepTimer()],
        )  # fmt: skip
        trainer.train()
        prompt_tokens = len(trainer.processing_class(prompt, add_special_tokens=False)["input_ids"])
    return {"prompt_tokens": prompt_tokens, "step_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mimic_iv", "tjh"], default="mimic_iv", help="whose first train patient")
    parser.add_argument("--visits", type=int, nargs="+", default=[1, 3], help="visits shown in the prompt (its length)")
    parser.add_argument("--text-style", choices=["paper", "compact"], default="paper", help="how the patient is written")
    parser.add_argument("--group", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per completion (exactly)")
    parser.add_argument("--steps", type=int, default=3, help="RL steps per side (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL with gradient checkpointing")
    parser.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench_rl_step_<dataset>.json")
    args = parser.parse_args()

    if args.worker:  # one side, one prompt length, in this process
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        args.visits = args.visits[0]
        result = (run_ours if args.worker == "ours" else run_trl)(args)
        result["peak_rss_gib"] = _peak_rss_gib()
        print("RESULT " + json.dumps(result), flush=True)
        return

    from eagrl.io import write_json_atomic

    rows = []
    for visits in args.visits:
        for side in args.sides:
            command = [sys.executable, __file__, "--worker", side, "--dataset", args.dataset, "--visits", str(visits),
                       "--text-style", args.text_style, "--group", str(args.group),
                       "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
            if args.gradient_checkpointing:
                command.append("--gradient-checkpointing")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{side} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(line[len("RESULT ") :])
            timed = result["step_s"][1:] or result["step_s"]
            row = {"side": side, "dataset": args.dataset, "visits": visits, "text_style": args.text_style, **result,
                   "median_step_s": statistics.median(timed)}
            rows.append(row)
            print(f"{side:>5}  {args.dataset} prompt {row['prompt_tokens']:5d} tokens  G={args.group}  {args.new_tokens} new tokens  "
                  f"median step {row['median_step_s']:7.1f} s  peak RSS {row['peak_rss_gib']:5.2f} GiB", flush=True)  # fmt: skip
    summary = {"group": args.group, "new_tokens": args.new_tokens, "threads": args.threads, "steps": args.steps,
               "trl_gradient_checkpointing": args.gradient_checkpointing, "rows": rows}  # fmt: skip
    out = args.out or REPO / "results" / f"bench_rl_step_{args.dataset}_{args.text_style}.json"
    write_json_atomic(out, summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
