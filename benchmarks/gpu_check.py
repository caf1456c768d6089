"""`make gpu-check`: everything a GPU can tell us about eagrl, in one command, part by part.

    python benchmarks/gpu_check.py                 # every part; results/gpu_check.json and results/gpu_check.md
    python benchmarks/gpu_check.py --parts kernel_bench concare

Parts (each a subprocess with its own time limit; a part that needs CUDA, a package or the TJH data that is not
there is recorded as skipped with the reason, and the others go on):

- ``gpu_tests``: ``pytest -m gpu`` (the kernels and the fused linear loss in fp32/bf16/fp16 against the
  reference at V = 151,936, including N·V > 2^31);
- ``kernel_bench``: ``benchmarks/kernel.py`` at N = 8,192 and 32,768, V = 151,936, bf16, with the fraction of the
  HBM roofline (the peak bandwidth measured by a device-to-device copy);
- ``fused_linear_bench``: ``benchmarks/kernel.py --linear`` at the same N and V, D = 3,584 (Qwen2.5-7B), bf16,
  against today's path and a cuBLAS matmul of the same shape;
- ``sft_rl_steps``: the smoke pipeline's synthetic stages on CUDA with a tiny random model: ConCare, stage 1, one
  SFT run, and RL with ``loss_backend: triton`` and ``compile_loss: true``, then with ``fused_linear``;
- ``qlora``: the SFT stage with the backbone in nf4 (bitsandbytes);
- ``fsdp``: the SFT stage under FSDP on every visible GPU (even one);
- ``concare``: ConCare on TJH: a CPU checkpoint tested on the GPU gives the CPU's probabilities within 1e-4, and a
  GPU fit's test AUROC is within 0.02 of the CPU fit's.

It needs the repository, the TJH data (``$EAGRL_DATA_DIR`` or ``../shared/data``) and the machine's own Python
with torch, lightning, transformers, peft, torchmetrics, triton and pandas; no download and no ``make install``.
The small pure-Python packages the CLI needs (jsonargparse, omegaconf, openpyxl, ...) are installed from
``wheels/gpu/`` (``make gpu-wheels`` fills it) into ``.gpu_site/``, never into the machine's Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "wheels" / "gpu"
SITE = REPO / ".gpu_site"
CLI_PACKAGES = ["jsonargparse", "omegaconf", "openpyxl", "docstring_parser", "typeshed_client", "yaml"]
NO_CUDA = "no CUDA device: skipped"

# name -> (time limit in s, what it needs besides CUDA: python modules and/or "tjh"); the limits add up to 8 minutes
PARTS: dict[str, tuple[int, list[str]]] = {
    "gpu_tests": (90, ["pytest", "triton"]),
    "kernel_bench": (60, ["triton"]),
    "fused_linear_bench": (60, ["triton"]),
    "concare": (90, ["jsonargparse", "openpyxl", "tjh"]),
    "sft_rl_steps": (90, ["jsonargparse", "triton", "peft"]),
    "qlora": (45, ["jsonargparse", "bitsandbytes", "peft"]),
    "fsdp": (45, ["jsonargparse", "peft"]),
}
BUDGET = 480  # s: the whole check; a part gets min(its limit, what is left)


def _env() -> dict[str, str]:
    """The subprocesses' environment: the repository and ``.gpu_site`` first on the path, offline."""
    path = [str(REPO), str(SITE), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # fmt: skip


def install_wheels() -> list[str]:
    """Install the CLI's missing pure-Python packages from ``wheels/gpu`` into ``.gpu_site``; the names installed."""
    missing = [name for name in CLI_PACKAGES if importlib.util.find_spec(name) is None and not (SITE / name).exists()]
    if not missing or not WHEELS.is_dir():
        return []
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(SITE), *wheels],
                       check=False, env=_env())  # fmt: skip
    return missing


def _have(module: str) -> bool:
    if module == "tjh":
        return _tjh_dir() is not None
    if importlib.util.find_spec(module) is not None:
        return True
    return (SITE / module).exists() or any(SITE.glob(f"{module}-*.dist-info")) or any(SITE.glob(f"{module.replace('_', '-')}*"))


def _tjh_dir() -> Path | None:
    root = Path(os.environ.get("EAGRL_DATA_DIR", REPO.parent / "shared" / "data"))
    return root if (root / "tjh" / "raw" / "time_series_375_prerpocess_en.xlsx").is_file() else None


def _cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, NO_CUDA
    return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"


def _run(command: list[str], limit: float, log: list[str]) -> subprocess.CompletedProcess:
    log.append("$ " + shlex.join(command))
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=max(limit, 1))
    log.append((done.stdout + done.stderr)[-3000:])
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {shlex.join(command[:6])} ... ({(done.stderr or done.stdout).strip().splitlines()[-1:] or ''})")
    return done


# --------------------------------------------------------------------------------------------- parts
def part_gpu_tests(out: Path, limit: float, log: list[str]) -> dict:
    done = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], limit, log)
    return {"summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


def part_kernel_bench(out: Path, limit: float, log: list[str]) -> dict:
    path = out / "bench_kernel.json"
    _run([sys.executable, "benchmarks/kernel.py", "--tokens", "8192", "32768", "--vocab", "151936", "--dtype", "bfloat16", "--repeats", "3",
          "--out", str(path)], limit, log)  # fmt: skip
    return json.loads(path.read_text())


def part_fused_linear_bench(out: Path, limit: float, log: list[str]) -> dict:
    path = out / "bench_fused_linear.json"
    _run([sys.executable, "benchmarks/kernel.py", "--linear", "--tokens", "8192", "32768", "--vocab", "151936", "--hidden", "3584",
          "--dtype", "bfloat16", "--repeats", "3", "--out", str(path)], limit, log)  # fmt: skip
    return json.loads(path.read_text())


def _smoke_stages(runs: Path) -> dict:
    """The smoke profile's synthetic stages (a tiny random model), by name."""
    sys.path.insert(0, str(REPO))
    from eagrl.pipeline import Plan

    return {s.name: s for s in Plan("smoke", runs).stages if s.name.startswith("synthetic/")}


def _eagrl(args: list[str], deadline: float, log: list[str]) -> float:
    begin = time.perf_counter()
    _run([sys.executable, "-m", "eagrl", *args], deadline - time.perf_counter(), log)
    return time.perf_counter() - begin


def part_sft_rl_steps(out: Path, limit: float, log: list[str]) -> dict:
    deadline, runs = time.perf_counter() + limit, out / "smoke_runs"
    stages, seconds = _smoke_stages(runs), {}
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    for name in ("synthetic/concare", "synthetic/distill", "synthetic/sft"):
        seconds[name] = _eagrl([*stages[name].args, *gpu], deadline, log)
    rl = stages["synthetic/rl"].args
    for backend, extra in (("triton_compiled", ["--model.init_args.loss_backend", "triton", "--model.init_args.compile_loss", "true"]),
                           ("fused_linear", ["--model.init_args.loss_backend", "fused_linear"])):  # fmt: skip
        root = runs / f"rl_{backend}"
        seconds[f"rl/{backend}"] = _eagrl([*rl, *gpu, *extra, "--trainer.default_root_dir", str(root)], deadline, log)
        metrics = json.loads((root / "metrics.json").read_text())
        assert any(k.startswith("train/") for k in metrics), f"rl {backend}: no training metric logged"
    return {"seconds": seconds}


def part_qlora(out: Path, limit: float, log: list[str]) -> dict:
    deadline, runs = time.perf_counter() + limit, out / "qlora_runs"
    stages = _smoke_stages(runs)
    _eagrl([*stages["synthetic/concare"].args, "--trainer.accelerator", "gpu"], deadline, log)
    _eagrl([*stages["synthetic/distill"].args, "--trainer.accelerator", "gpu"], deadline, log)
    seconds = _eagrl([*stages["synthetic/sft"].args, "--trainer.accelerator", "gpu", "--model.init_args.backbone.quantization", "nf4"], deadline, log)
    return {"sft_seconds": seconds}


def part_fsdp(out: Path, limit: float, log: list[str]) -> dict:
    import torch

    deadline, runs = time.perf_counter() + limit, out / "fsdp_runs"
    stages = _smoke_stages(runs)
    _eagrl([*stages["synthetic/concare"].args, "--trainer.accelerator", "gpu", "--trainer.devices", "1"], deadline, log)
    _eagrl([*stages["synthetic/distill"].args, "--trainer.accelerator", "gpu", "--trainer.devices", "1"], deadline, log)
    seconds = _eagrl([*stages["synthetic/sft"].args, "--config", "configs/scale/sft_fsdp.yaml", "--trainer.accelerator", "gpu",
                      "--trainer.devices", str(torch.cuda.device_count())], deadline, log)  # fmt: skip
    return {"gpus": torch.cuda.device_count(), "sft_seconds": seconds}


def _probabilities(path: Path) -> dict[str, float]:
    """sample id -> ConCare's probability, from an expert export (kept in memory only)."""
    return {(r["split"], r["id"]): float(r["prob"]) for r in map(json.loads, path.read_text().splitlines())}


def part_concare(out: Path, limit: float, log: list[str]) -> dict:
    deadline = time.perf_counter() + limit
    base = ["--config", "configs/tjh/concare.yaml", "--trainer.max_epochs", "10", "--trainer.min_epochs", "10"]
    cpu, gpu_test, gpu_fit = out / "concare_cpu", out / "concare_gpu_test", out / "concare_gpu_fit"
    _eagrl(["fit", *base, "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(cpu)], deadline, log)
    _eagrl(["test", *base, "--trainer.accelerator", "gpu", "--ckpt_path", str(cpu / "checkpoints" / "best.ckpt"),
            "--trainer.default_root_dir", str(gpu_test)], deadline, log)  # fmt: skip
    _eagrl(["fit", *base, "--trainer.accelerator", "gpu", "--trainer.default_root_dir", str(gpu_fit)], deadline, log)
    on_cpu, on_gpu = _probabilities(cpu / "expert_attention.jsonl"), _probabilities(gpu_test / "expert_attention.jsonl")
    difference = max(abs(on_cpu[k] - on_gpu[k]) for k in on_cpu)
    auroc = {name: json.loads((folder / "metrics.json").read_text())["test/auroc"] for name, folder in (("cpu", cpu), ("gpu", gpu_fit))}
    result = {"max_prob_difference": difference, "test_auroc": auroc, "auroc_difference": abs(auroc["cpu"] - auroc["gpu"])}
    assert difference <= 1e-4, f"a CPU checkpoint tested on the GPU: probabilities differ by {difference:.2e} (> 1e-4)"
    assert result["auroc_difference"] <= 0.02, f"GPU fit AUROC {auroc['gpu']:.4f} vs CPU {auroc['cpu']:.4f} (> 0.02 apart)"
    return result


def check(parts: list[str], out: Path) -> dict:
    """Run ``parts``; returns the record written to ``gpu_check.json``."""
    out.mkdir(parents=True, exist_ok=True)
    cuda, device = _cuda()
    installed = install_wheels() if cuda else []
    record = {"device": device, "cuda": cuda, "python": sys.version.split()[0], "installed_from_wheels": installed, "parts": {}}
    deadline = time.perf_counter() + BUDGET
    for name in parts:
        limit, needs = PARTS[name]
        limit = min(limit, deadline - time.perf_counter())
        lacking = [n for n in needs if not _have(n)]
        if not cuda:
            record["parts"][name] = {"status": "skipped", "reason": device}
        elif lacking:
            record["parts"][name] = {"status": "skipped", "reason": f"missing: {', '.join(lacking)}"}
        elif limit < 10:
            record["parts"][name] = {"status": "skipped", "reason": f"the check's {BUDGET} s were spent"}
        else:
            log: list[str] = []
            begin = time.perf_counter()
            try:
                result = {"status": "passed", **globals()[f"part_{name}"](out, limit, log)}
            except subprocess.TimeoutExpired:
                result = {"status": "timeout", "reason": f"stopped at its limit of {limit:.0f} s"}
            except Exception as err:  # noqa: BLE001 - a failing part is recorded; the others run
                result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
            result["seconds"] = round(time.perf_counter() - begin, 1)
            (out / f"{name}.log").write_text("\n".join(log))
            record["parts"][name] = result
        print(f"{name:>20}: {record['parts'][name]['status']} {record['parts'][name].get('reason', '')}", flush=True)
    return record


def markdown(record: dict) -> str:
    lines = [f"# GPU check: {record['device']}", "", "| part | status | seconds | detail |", "|---|---|---|---|"]
    for name, part in record["parts"].items():
        detail = part.get("reason", "")
        if name == "concare" and part["status"] == "passed":
            detail = f"max |Δp| {part['max_prob_difference']:.1e}; AUROC CPU {part['test_auroc']['cpu']:.4f}, GPU {part['test_auroc']['gpu']:.4f}"
        if name.endswith("_bench") and part["status"] == "passed":
            detail = "; ".join(f"{r['path']} N={r['tokens']}: {r.get('forward_backward_ms', 0):.1f} ms" for r in part.get("rows", []))
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    args = parser.parse_args(argv)
    record = check(args.parts, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out.parent / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out.parent / "gpu_check.md").write_text(markdown(record))
    print(f"wrote {args.out.parent / 'gpu_check.json'} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
