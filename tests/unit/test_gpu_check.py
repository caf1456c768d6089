"""``make gpu-check`` on a machine without CUDA: every part says why it was skipped, nothing fails, the JSON and the
markdown summary are written (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_gpu_check_on_a_cpu_skips_every_part(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(record["parts"]) == {"gpu_tests", "kernel_bench", "fused_linear_bench", "concare", "sft_rl_steps", "qlora", "fsdp"}
    assert all(part == {"status": "skipped", "reason": "no CUDA device: skipped"} for part in record["parts"].values())
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.count("| skipped |") == 7 and "no CUDA device: skipped" in done.stdout


def test_a_missing_package_skips_its_part_and_the_others_run(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "_cuda", lambda: (True, "a pretend GPU"))
    monkeypatch.setattr(gpu_check, "install_wheels", lambda: [])
    monkeypatch.setattr(gpu_check, "PARTS", {"qlora": (30, ["a_package_that_is_not_there"]), "fsdp": (30, [])})
    monkeypatch.setattr(gpu_check, "part_fsdp", lambda out, limit, log: {"gpus": 1})
    record = gpu_check.check(["qlora", "fsdp"], tmp_path)
    assert record["parts"]["qlora"] == {"status": "skipped", "reason": "missing: a_package_that_is_not_there"}
    assert record["parts"]["fsdp"]["status"] == "passed" and record["parts"]["fsdp"]["gpus"] == 1


def test_a_part_gets_only_what_is_left_of_the_budget(monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "_cuda", lambda: (True, "a pretend GPU"))
    monkeypatch.setattr(gpu_check, "install_wheels", lambda: [])
    monkeypatch.setattr(gpu_check, "BUDGET", 5)
    record = gpu_check.check(["fsdp"], tmp_path)
    assert record["parts"]["fsdp"] == {"status": "skipped", "reason": "the check's 5 s were spent"}
