"""Generation throughput of the embedded SmolLM2-135M on CPU, ours against plain ``model.generate``,
and the prompt lengths of TJH and MIMIC-IV prompts.

    python benchmarks/generation.py [--threads 2] [--new-tokens 64] [--batches 1 8] [--repeats 2]

Both paths get the same chat-templated MIMIC-IV demo test prompts (vanilla style), greedy decoding and
exactly ``--new-tokens`` new tokens per prompt (end-of-text suppressed until then); tokens/s counts new
tokens over wall time, prefill included. "Plain" is one ``model.generate`` call on the tokenizer's
left-padded batch, the way a user would write it; "ours" is ``eagrl.llm.generation.generate`` (length-sorted
batches, text decoding and bookkeeping included). Results go to ``results/bench_generation.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the median is kept)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_generation.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    from datamodules import EHRDataModule
    from eagrl.io import write_json_atomic
    from eagrl.llm.generation import SamplingOptions, generate
    from eagrl.llm.prompts import STYLES, build_prompt
    from eagrl.models.backbone import load_backbone

    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone()
    report: dict = {"threads": args.threads, "new_tokens": args.new_tokens, "throughput": {}, "prompt_tokens": {}}

    # prompt lengths, per dataset, style and visit cap
    for dataset, caps in (("tjh", (None, 5, 3)), ("mimic_iv", (None,))):
        dm = EHRDataModule(dataset=dataset, progress=False)
        dm.setup()
        data = dm.datasets["test"]
        for style in STYLES:
            for cap in caps:
                lengths = [
                    len(tokenizer(build_prompt(tokenizer, data.text(i, max_visits=cap), dataset, "mortality", style), add_special_tokens=False)["input_ids"])
                    for i in range(len(data))
                ]
                key = f"{dataset}/{style}/max_visits={cap or 'all'}"
                report["prompt_tokens"][key] = {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)), "max": max(lengths)}
                print(f"prompt tokens {key:40s} median {np.median(lengths):6.0f}  p90 {np.percentile(lengths, 90):6.0f}  max {max(lengths):6d}")

    dm = EHRDataModule(dataset="mimic_iv", progress=False)
    dm.setup()
    data = dm.datasets["test"]
    prompts = [build_prompt(tokenizer, data.text(i), "mimic_iv", "mortality", "vanilla") for i in range(max(args.batches))]
    options = SamplingOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def plain(batch: list[str]) -> None:
        tokenizer.padding_side = "left"
        encoded = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**encoded, **options.generation_kwargs(), pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - encoded["input_ids"].shape[1] == args.new_tokens

    def ours(batch: list[str]) -> None:
        results = generate(model, tokenizer, batch, options, batch_size=len(batch))
        assert all(r.new_tokens == args.new_tokens for r in results)

    ours(prompts[:1])  # warm-up
    for size in args.batches:
        batch = prompts[:size]
        row = {}
        for name, run in (("plain", plain), ("ours", ours)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(batch)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            row[name] = {"seconds": seconds, "tokens_per_s": size * args.new_tokens / seconds}
        row["prompt_tokens_mean"] = float(np.mean([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in batch]))
        report["throughput"][str(size)] = row
        print(
            f"batch {size}: plain {row['plain']['tokens_per_s']:6.1f} tok/s, ours {row['ours']['tokens_per_s']:6.1f} tok/s "
            f"({args.new_tokens} new tokens, prompts of {row['prompt_tokens_mean']:.0f} tokens, {args.threads} threads)"
        )
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
