"""Generation speed of the embedded SmolLM2-135M on this machine: our engine against plain ``model.generate``
in float32, and the tokens per prompt of both text styles.

    python benchmarks/generation.py [--threads 2] [--new-tokens 64] [--batch 8] [--repeats 1] [--parts speed prefill decode compile]

Measured in one run, on the first ``--batch`` test patients, greedy, exactly ``--new-tokens`` new tokens per
prompt (end-of-text suppressed until then), wall time with the prefill included:

- **plain**: one ``model.generate`` call in float32 on the tokenizer's left-padded batch, the way a user writes it;
- **ours**: ``eagrl.llm.generation.generate`` with the engine ``backbone.generation_dtype: auto`` picks on this
  machine (per-prompt chunked prefill, static-cache decode; text decoding and bookkeeping included).

Comparisons: MIMIC-IV decomposition prompts in the paper style for both; TJH decomposition prompts in the
paper style for plain and the compact style for ours (what a user gains by switching). Also (``--parts``):
``prefill``, the prefill rate per chunk size as a fraction of the float32 linear-layer rate measured in the
same run; ``decode``, one decode step with a static against a dynamic cache continuing the same prefilled
cache (alternated, twice each); ``compile``, the static-cache step compiled (transformers' ``CompileConfig``
forced onto the CPU) against eager, first call (compiling) and second. Results:
``results/bench_generation.json`` (``--out``).
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
    parser.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the median is kept)")
    parser.add_argument("--parts", nargs="+", default=["speed", "prefill", "decode"], choices=["speed", "prefill", "decode", "compile"])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_generation.json")
    args = parser.parse_args()

    import numpy as np
    import torch

    from datamodules import EHRDataModule
    from eagrl.io import write_json_atomic
    from eagrl.llm.generation import SamplingOptions, continuing_cache, generate, matmul_rates, prefill
    from eagrl.llm.prompts import build_prompt
    from eagrl.models.backbone import BackboneOptions, generation_engine, load_backbone

    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone()
    model.eval()
    engine = generation_engine(BackboneOptions(), "cpu")
    fp32_rate, bf16_rate = matmul_rates("cpu")
    report: dict = {
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "engine": engine.describe(),
        "linear_gflops": {"float32": fp32_rate, "bfloat16": bf16_rate},
        "prompt_tokens": {},
        "throughput": {},
    }
    print(f"engine: {engine.describe()}")
    options = SamplingOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def count(prompt: str) -> int:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    prompts: dict[tuple[str, str], list[str]] = {}
    for dataset in ("tjh", "mimic_iv"):
        dm = EHRDataModule(dataset=dataset, progress=False)
        dm.setup()
        data = dm.datasets["test"]
        for style in ("paper", "compact"):
            texts = [build_prompt(tokenizer, data.text(i, style=style), dataset, "mortality", "decomposition") for i in range(len(data))]
            lengths = [count(t) for t in texts]
            row = {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)), "max": max(lengths)}
            report["prompt_tokens"][f"{dataset}/{style}"] = row
            print(f"prompt tokens {dataset}/{style:8s} median {row['median']:6.0f}  p90 {row['p90']:6.0f}  max {row['max']:6d}")
            prompts[(dataset, style)] = texts[: args.batch]

    def plain(batch: list[str]) -> None:
        tokenizer.padding_side = "left"
        encoded = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**encoded, **options.generation_kwargs(), pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - encoded["input_ids"].shape[1] == args.new_tokens

    def ours(batch: list[str], with_engine: Engine = engine) -> None:
        results = generate(model, tokenizer, batch, options, batch_size=len(batch), engine=with_engine)
        assert all(r.new_tokens == args.new_tokens for r in results)

    def timed(run, batch) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    ours(prompts[("mimic_iv", "compact")][:1])  # warm-up
    cases = {} if "speed" not in args.parts else {
        "mimic_iv paper (both)": (prompts[("mimic_iv", "paper")], prompts[("mimic_iv", "paper")]),
        "tjh paper (plain) vs compact (ours)": (prompts[("tjh", "paper")], prompts[("tjh", "compact")]),
    }
    for name, (plain_batch, our_batch) in cases.items():
        row = {"plain_s": timed(plain, plain_batch), "ours_s": timed(ours, our_batch)}
        row["speedup"] = row["plain_s"] / row["ours_s"]
        row["plain_prompt_tokens"] = sum(count(p) for p in plain_batch)
        row["ours_prompt_tokens"] = sum(count(p) for p in our_batch)
        report["throughput"][name] = row
        print(
            f"{name}: plain {row['plain_s']:.1f} s ({row['plain_prompt_tokens']} prompt tokens), "
            f"ours {row['ours_s']:.1f} s ({row['ours_prompt_tokens']} prompt tokens): {row['speedup']:.2f}x"
        )

    # the prefill alone: its rate, and as a fraction of the linear-layer rate (2 FLOPs per weight per token)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # lm_head runs on the last token only
    batch = prompts[("tjh", "paper")]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch]
    chunks = {}
    for chunk in (256, 512, 1024, 0) if "prefill" in args.parts else ():
        with torch.inference_mode():
            start = time.perf_counter()
            prefill(model, encoded, chunk)
            seconds = time.perf_counter() - start
        rate = sum(map(len, encoded)) / seconds
        chunks[str(chunk or "whole")] = {"tokens_per_s": rate, "fraction_of_linear_rate": rate * 2 * weights / 1e9 / fp32_rate}
        print(f"prefill, chunk {chunk or 'whole':>5}: {rate:6.0f} tokens/s = {chunks[str(chunk or 'whole')]['fraction_of_linear_rate']:.0%} of the fp32 linear rate ({fp32_rate:.0f} GFLOP/s)")
    report["prefill"] = {"prompts": "tjh paper", "weights_per_token": weights, "by_chunk": chunks}

    # one decode step, static against dynamic cache, continuing the same prefilled MIMIC-IV paper batch
    batch = prompts[("mimic_iv", "paper")]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch]
    padded = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
    longest, steps = padded["input_ids"].shape[1], 32
    greedy = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, temperature=None, top_p=None, top_k=None)
    layers = None

    def step_ms(kind: str, compile_config=None) -> float:
        cache = continuing_cache(model, layers, longest - 1, steps + 1, kind)
        extra = {"compile_config": compile_config} if compile_config is not None else {"disable_compile": True}
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**padded, past_key_values=cache, **greedy, **extra, pad_token_id=tokenizer.pad_token_id)
        return 1000 * (time.perf_counter() - start) / steps

    if {"decode", "compile"} & set(args.parts):
        with torch.inference_mode():
            layers, _ = prefill(model, encoded, engine.prefill_chunk)
    if "decode" in args.parts:
        decode = {"static": [], "dynamic": []}
        for kind in ("static", "dynamic", "static", "dynamic"):
            decode[kind].append(step_ms(kind))
            print(f"decode step, {kind} cache: {decode[kind][-1]:.0f} ms (batch {len(batch)}, {longest}-token prompts, {steps} steps)", flush=True)
        report["decode_step_ms"] = decode
    if "compile" in args.parts:
        from transformers import CompileConfig

        compiled = CompileConfig(mode="default")
        compiled._compile_all_devices = True  # transformers compiles the static-cache step only on accelerators otherwise
        rows = {"eager": step_ms("static"), "compiled_first_call": step_ms("static", compiled), "compiled_second_call": step_ms("static", compiled)}
        rows["eager_again"] = step_ms("static")
        report["compiled_decode_step_ms"] = rows
        print("compiled decode step: " + ", ".join(f"{k} {v:.0f} ms" for k, v in rows.items()), flush=True)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
