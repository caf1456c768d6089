"""Interrupted runs: every long stage is started through the real CLI, killed with SIGKILL at several
points, rerun with the same command plus resume, and must end with the artefacts of a run that was never
interrupted. Also: a truncated checkpoint is reported, never loaded; the same seed gives the same run.

Tolerance: metrics and weights of a resumed run equal the uninterrupted run's within ``TOLERANCE``
(absolute). On one CPU they are bit-identical (the random state is restored from the checkpoint); the
tolerance leaves room for another reduction order on other hardware. Distillation output is compared
byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eagrl.evaluation.report import _metrics_csv
from tests.conftest import REPO, run_cli

TOLERANCE = 1e-6
# the LLM runs generate in float32 whatever the machine's load: under `auto` each run picks its dtype from a start-up
# matmul benchmark, so on a loaded machine two runs compared here (resumed and uninterrupted; in test_multiprocess,
# 2 ranks and 1 process) can pick differently, and then nothing matches
PINNED = ["--model.init_args.backbone.generation_dtype", "float32"]
CONCARE = ["fit", "--config", "configs/tjh/concare.yaml", "--config", "configs/smoke/concare.yaml", "--trainer.max_epochs", "6"]
DISTILL = [
    "predict", "--config", "configs/tjh/distill.yaml", "--config", "configs/smoke/distill.yaml",
    "--data.init_args.batch_size", "1", "--trainer.limit_predict_batches", "3", "--model.init_args.search.rollouts", "3", *PINNED,
]  # fmt: skip
SFT = ["fit", "--config", "configs/tjh/sft.yaml", "--config", "configs/smoke/sft.yaml", "--trainer.max_epochs", "3", *PINNED]
RL = ["fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/smoke/rl.yaml", "--trainer.max_epochs", "2", *PINNED]  # 2 rollouts per epoch

pytestmark = pytest.mark.slow


def _stamp(path: Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def run_and_kill(args: list[str], cache: Path, watch: Path, changes: int) -> None:
    """Start ``python -m eagrl ARGS`` and SIGKILL it (with every process it started: the other ranks of a
    multi-process run) once ``watch`` has been written ``changes`` times."""
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    env = {**os.environ, "EAGRL_CACHE_DIR": str(cache)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eagrl", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        seen, last, deadline = 0, _stamp(watch), time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            stamp = _stamp(watch)
            if stamp != last:
                seen, last = seen + 1, stamp
            if seen >= changes:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
    log.unlink()


def _finish(args: list[str], cache: Path) -> None:
    result = run_cli(*args, cache=cache)  # in this process: the killed runs are the new processes
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(root: Path) -> dict[str, float]:
    return json.loads((root / "metrics.json").read_text())


def assert_same_metrics(resumed: Path, reference: Path, prefixes: tuple[str, ...]) -> None:
    want, got = _metrics(reference), _metrics(resumed)
    names = [k for k in want if k.startswith(prefixes)]
    assert names, "no metrics to compare"
    for name in names:
        assert got[name] == pytest.approx(want[name], abs=TOLERANCE), name


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=TOLERANCE, rtol=0, msg=name)


def _last_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------ ConCare
@pytest.fixture(scope="module")
def concare_runs(tmp_path_factory, session_cache) -> dict[str, Path]:
    """Two uninterrupted fits with the same seed."""
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path_factory.mktemp(f"concare-{name}")
        _finish([*CONCARE, "--trainer.default_root_dir", str(runs[name])], session_cache)
    return runs


def test_same_seed_gives_identical_concare_test_metrics(concare_runs):
    a, b = _metrics(concare_runs["a"]), _metrics(concare_runs["b"])
    test = {k: v for k, v in a.items() if k.startswith("test/")}
    assert test and test == {k: b[k] for k in test}
    assert (concare_runs["a"] / "expert_attention.jsonl").read_bytes() == (concare_runs["b"] / "expert_attention.jsonl").read_bytes()


def test_concare_killed_twice_then_resumed_matches_the_uninterrupted_fit(concare_runs, tmp_path, session_cache):
    args = [*CONCARE, "--trainer.default_root_dir", str(tmp_path)]
    last = tmp_path / "checkpoints/last.ckpt"
    run_and_kill(args, session_cache, last, changes=1)  # during epoch 2 (or later)
    run_and_kill([*args, "--ckpt_path", "last"], session_cache, last, changes=2)
    _finish([*args, "--ckpt_path", "last"], session_cache)
    reference = concare_runs["a"]
    assert_same_metrics(tmp_path, reference, ("val/", "test/"))
    assert (tmp_path / "expert_attention.jsonl").read_bytes() == (reference / "expert_attention.jsonl").read_bytes()
    assert_same_tensors(_last_weights(tmp_path), _last_weights(reference))


@pytest.mark.parametrize("how", ["last", "path"])
def test_a_truncated_checkpoint_is_reported_not_loaded(concare_runs, tmp_path, session_cache, how):
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    data = (concare_runs["a"] / "checkpoints/last.ckpt").read_bytes()
    damaged = data[: len(data) // 2]
    (root / "checkpoints/last.ckpt").write_bytes(damaged)
    ckpt_path = "last" if how == "last" else str(root / "checkpoints/last.ckpt")
    result = run_cli(*CONCARE, "--trainer.default_root_dir", str(root), "--ckpt_path", ckpt_path, cache=session_cache)
    assert result.returncode == 2
    assert "last.ckpt is truncated or damaged" in result.stderr and "Traceback" not in result.stderr
    assert (root / "checkpoints/last.ckpt").read_bytes() == damaged  # left for the user, not overwritten
    assert not (root / "metrics.json").exists()


# ------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def expert(concare_runs) -> Path:
    return concare_runs["a"] / "expert_attention.jsonl"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, expert, session_cache) -> Path:
    root = tmp_path_factory.mktemp("distill")
    _finish([*DISTILL, "--trainer.default_root_dir", str(root), "--model.init_args.expert_attention", str(expert)], session_cache)
    return root


def test_distillation_killed_twice_then_resumed_is_identical(distilled, expert, tmp_path, session_cache):
    args = [*DISTILL, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.expert_attention", str(expert)]
    done = tmp_path / "trajectories.jsonl.done"
    run_and_kill(args, session_cache, done, changes=1)  # after the first patient
    run_and_kill(args, session_cache, done, changes=3)  # recovery rewrites the list, then two more patients
    _finish(args, session_cache)
    assert (tmp_path / "trajectories.jsonl").read_bytes() == (distilled / "trajectories.jsonl").read_bytes()
    assert sorted(done.read_text().split()) == sorted((distilled / "trajectories.jsonl.done").read_text().split())


# ---------------------------------------------------------------------------------------------- SFT
@pytest.fixture(scope="module")
def sft_args(distilled, expert) -> list[str]:
    return [*SFT, "--data.init_args.trajectories", str(distilled / "trajectories.jsonl"), "--model.init_args.expert_attention", str(expert)]


def test_sft_killed_twice_then_resumed_matches_the_uninterrupted_fit(sft_args, tmp_path, session_cache):
    reference, root = tmp_path / "reference", tmp_path / "killed"
    _finish([*sft_args, "--trainer.default_root_dir", str(reference)], session_cache)
    args = [*sft_args, "--trainer.default_root_dir", str(root)]
    last = root / "checkpoints/last.ckpt"
    run_and_kill(args, session_cache, last, changes=1)
    run_and_kill([*args, "--ckpt_path", "last"], session_cache, last, changes=1)
    _finish([*args, "--ckpt_path", "last"], session_cache)
    assert_same_metrics(root, reference, ("train/loss_epoch", "val/", "test/"))
    adapter = "model/adapter/adapter_model.safetensors"
    assert_same_tensors(load_file(root / adapter), load_file(reference / adapter))
    assert (root / "generations.jsonl").read_text() == (reference / "generations.jsonl").read_text()


# ----------------------------------------------------------------------------------------------- RL
def test_rl_killed_twice_then_resumed_matches_the_uninterrupted_fit(expert, tmp_path, session_cache):
    rl = [*RL, "--model.init_args.expert_attention", str(expert)]
    reference, root = tmp_path / "reference", tmp_path / "killed"
    _finish([*rl, "--trainer.default_root_dir", str(reference)], session_cache)
    args = [*rl, "--trainer.default_root_dir", str(root)]
    # a checkpoint every rollout (4, 2 per epoch); each kill comes after a rollout's row is logged, which is after
    # its checkpoint: the first inside epoch 1 (rollout 1 logged), the second inside epoch 2 (rollout 3 logged)
    run_and_kill(args, session_cache, root / "logs/version_0/metrics.csv", changes=1)
    run_and_kill([*args, "--ckpt_path", "last"], session_cache, root / "logs/version_1/metrics.csv", changes=2)
    _finish([*args, "--ckpt_path", "last"], session_cache)
    assert_same_metrics(root, reference, ("train/reward", "train/loss", "train/entropy", "test/"))
    adapter = "model/adapter/adapter_model.safetensors"
    assert_same_tensors(load_file(root / adapter), load_file(reference / adapter))
    rows, want = _metrics_csv(root), _metrics_csv(reference)  # the report's curve: the resumed run's 3 logger versions joined
    assert [r["step"] for r in rows] == [r["step"] for r in want] == ["0", "1", "2", "3"]
    for name in ("train/reward", "train/entropy", "train/loss"):
        assert [float(r[name]) for r in rows] == pytest.approx([float(r[name]) for r in want], abs=TOLERANCE), name


def test_rl_resumed_from_the_rollout_that_spent_its_budget_only_tests(expert, tmp_path, session_cache):
    args = [*RL, "--model.init_args.expert_attention", str(expert), "--model.init_args.max_generated_tokens", "1", "--trainer.default_root_dir", str(tmp_path)]
    _finish(args, session_cache)  # stops after its first rollout
    before = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert before["global_step"] > 0 and before["eagrl_generated_tokens"] >= 1
    (tmp_path / "metrics.json").unlink()
    _finish([*args, "--ckpt_path", "last"], session_cache)  # as after a kill while testing
    after = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == before["global_step"]  # no further rollout
    assert_same_tensors(after["state_dict"], before["state_dict"])
    assert "test/auroc" in _metrics(tmp_path) and len(_metrics_csv(tmp_path)) == 1
