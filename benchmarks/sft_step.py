"""One SFT step of the CPU config on this machine: the paper text style against the compact one, and
float32 against bf16 autocast (fp32 master weights either way), in one run.

    python benchmarks/sft_step.py [--dataset tjh] [--visits 2] [--batch 4] [--steps 3] [--styles paper compact] [--autocast off bf16]

The step is ``configs/<dataset>/sft.yaml``'s: the embedded SmolLM2-135M in fp32 with LoRA r 4 / alpha 8 on
q/k/v/o, gradient checkpointing, ``--batch`` (prompt, completion) pairs of the first train patients showing
their last ``--visits`` visits, a fixed decomposition completion of ~150 tokens, the completion-only
causal-LM loss (``eagrl.llm.sft``), backward and an AdamW step. The time is the median step after a
warm-up one. Results: ``results/bench_sft_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
COMPLETION = (
    "<Subquestion> Which values are outside their normal ranges, and how far?\n<Answer> Lactate dehydrogenase and "
    "high-sensitivity C-reactive protein are high and rising; the lymphocyte count is low.\n<Subquestion> What do "
    "these findings suggest?\n<Answer> Systemic inflammation with tissue injury, a pattern seen in severe disease.\n"
    "<Final subquestion> Is the outcome likely?\n<Important Features> Lactate dehydrogenase, High sensitivity "
    "C-reactive protein, lymphocyte count, albumin, D-D dimer\n<Final Answer> 0.72"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["tjh", "mimic_iv"], default="tjh")
    parser.add_argument("--visits", type=int, default=2, help="visits shown (the CPU SFT config: 2 for TJH)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (the CPU config: 4)")
    parser.add_argument("--steps", type=int, default=3, help="steps per setting (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--styles", nargs="+", default=["paper", "compact"], choices=["paper", "compact"])
    parser.add_argument("--autocast", nargs="+", default=["off", "bf16"], choices=["off", "bf16"], help="float32 and/or bf16 autocast")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_sft_step.json")
    args = parser.parse_args()

    import torch

    from datamodules import EHRDataModule
    from eagrl.io import write_json_atomic
    from eagrl.llm.prompts import build_prompt
    from eagrl.llm.sft import sft_batch
    from lightning_modules.sft import completion_loss
    from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone

    torch.set_num_threads(args.threads)
    dm = EHRDataModule(dataset=args.dataset, max_visits=args.visits, progress=False)
    dm.setup()
    data = dm.datasets["train"]
    lora = LoraOptions(rank=4, alpha=8, dropout=0.05)
    tokenizer0 = _tokenizer()
    rows = []
    for style in args.styles:
        prompts = [build_prompt(tokenizer0, data.text(i, style=style), args.dataset, "mortality", "decomposition", 2) for i in range(args.batch)]
        for autocast in [a == "bf16" for a in args.autocast]:
            torch.manual_seed(0)
            model, tokenizer = load_backbone(BackboneOptions(dtype="float32", lora=lora, gradient_checkpointing=True))
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
            batch = sft_batch(tokenizer, prompts, [COMPLETION] * args.batch)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with context:
                    loss = completion_loss(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            row = {
                "text_style": style,
                "autocast": "bf16" if autocast else "off",
                "tokens_per_pair": float(batch["attention_mask"].sum(-1).float().mean()),
                "median_step_s": statistics.median(times[1:] or times),
                "loss": float(loss),
            }
            rows.append(row)
            print(
                f"{style:8s} autocast {row['autocast']:4s}: {row['tokens_per_pair']:6.0f} tokens per pair, "
                f"median step {row['median_step_s']:6.1f} s (loss {row['loss']:.3f})",
                flush=True,
            )
    write_json_atomic(args.out, {"dataset": args.dataset, "visits": args.visits, "batch": args.batch, "threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")


def _tokenizer():
    from eagrl.models.backbone import embedded_tokenizer

    return embedded_tokenizer()


if __name__ == "__main__":
    main()
