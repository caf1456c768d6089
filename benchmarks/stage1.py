"""Stage 1 on the CPU defaults: distillation then SFT through the real CLI, timed.

    python benchmarks/stage1.py --dataset mimic_iv --expert runs/mimic_iv/concare_mortality/expert_attention.jsonl

Runs ``predict`` with ``configs/<dataset>/distill.yaml`` and ``fit`` with ``configs/<dataset>/sft.yaml`` into
``--out`` (a fresh folder), and reports wall time, trajectories per minute, generated tokens per second
(tokens the search generated, over the distillation's wall time, model loading included) and the SFT
run's metrics. Results go to ``<out>/bench_stage1.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "eagrl", *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"failed: python -m eagrl {' '.join(args)}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["tjh", "mimic_iv"], default="mimic_iv")
    parser.add_argument("--expert", type=Path, required=True, help="the ConCare run's expert_attention.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_stage1")
    parser.add_argument("--extra", nargs="*", default=[], help="more CLI overrides for both runs")
    args = parser.parse_args()
    out = args.out / args.dataset
    if out.exists():
        raise SystemExit(f"{out} exists: give a fresh --out")
    distill_dir, sft_dir = out / "distill", out / "sft"
    distill_seconds = run(
        ["predict", "--config", f"configs/{args.dataset}/distill.yaml", "--trainer.default_root_dir", str(distill_dir),
         "--model.init_args.expert_attention", str(args.expert), *args.extra]
    )  # fmt: skip
    records = [json.loads(line) for line in (distill_dir / "trajectories.jsonl").read_text().splitlines()]
    patients = {r["id"]: r for r in records}
    scored = sum(r["trajectories_scored"] for r in patients.values())
    tokens = sum(r["tokens_generated"] for r in patients.values())
    done = len((distill_dir / "trajectories.jsonl.done").read_text().split())
    sft_seconds = run(
        ["fit", "--config", f"configs/{args.dataset}/sft.yaml", "--trainer.default_root_dir", str(sft_dir),
         "--data.init_args.trajectories", str(distill_dir / "trajectories.jsonl"), "--model.init_args.expert_attention", str(args.expert), *args.extra]
    )  # fmt: skip
    metrics = json.loads((sft_dir / "metrics.json").read_text())
    report = {
        "dataset": args.dataset,
        "patients_searched": done,
        "patients_with_kept_trajectories": len(patients),
        "trajectories_kept": len(records),
        "trajectories_scored": scored,
        "distill_seconds": distill_seconds,
        "trajectories_scored_per_minute": scored / distill_seconds * 60,
        "generated_tokens_per_second": tokens / distill_seconds,
        "sft_seconds": sft_seconds,
        "total_minutes": (distill_seconds + sft_seconds) / 60,
        "sft_metrics": {k: v for k, v in metrics.items() if k.split("/")[0] in ("val", "test", "train")},
    }
    (out / "bench_stage1.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "sft_metrics"}, indent=2))


if __name__ == "__main__":
    main()
