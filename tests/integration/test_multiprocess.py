"""Several processes on a CPU (Lightning's DDP strategy, gloo backend, 2 processes) through the real CLI:
each run must equal the 1-process run on the same data.

- ConCare: 2 ranks of batch 16 see together the batches of 1 process of batch 32 (``EpochShuffle``), so
  training, validation, test metrics, checkpoints and the expert export match, including a fit resumed
  under DDP. DeCov is off here: it is a statistic of each rank's batch, so with it on the two runs
  differ by design (the classification loss and the metrics' reduction are what is tested).
- Evaluation: a checkpoint tested with 2 processes gives exactly the 1-process metrics (the shards are
  gathered and the sampler's padding dropped before the bootstrap).
- RL: 2 ranks with 1 patient each equal 1 process with both (per-prompt seeded rollouts; token mean,
  ε(τ) normaliser and statistics reduced over the ranks). The gradient reduction itself is tested on
  nonzero advantages in ``tests/unit/test_distributed_update.py`` (a random model earns equal rewards).
- SFT: the same test metrics (its loss is a per-rank token mean, within 1e-3 relative).
- Distillation: 2 ranks search whole batches and their parts merge into the 1-process file, also after a
  kill and a rerun.

Tolerance: 1e-6 absolute on metrics and weights (they come out identical on one machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.integration.test_interrupted_runs import PINNED, run_and_kill  # PINNED: the LLM runs generate in float32

TOLERANCE = 1e-6
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
# 138 of the 139 TJH train patients: an even count, so 2 ranks need no padding (a padded repeat is a real difference)
CONCARE = ["--config", "configs/tjh/concare.yaml", "--config", "configs/smoke/concare.yaml", "--model.init_args.decov_weight", "0",
           "--data.init_args.train_patients", "138"]  # fmt: skip

pytestmark = pytest.mark.slow


def _ok(*args: str, cache: Path) -> None:
    result = run_cli(*args, cache=cache, fresh_process="ddp" in args)  # two ranks: a process of their own; one: this process
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics(root: Path) -> dict[str, float]:
    return json.loads((root / "metrics.json").read_text())


def assert_same(got: Path, want: Path, skip: tuple[str, ...] = ()) -> None:
    a, b = _metrics(want), _metrics(got)
    names = [k for k in a if not k.startswith(skip) and not k.endswith("step_time") and k != "generation"]
    assert names
    generation = a.get("generation")
    if generation:  # how it generated: the same settings, whatever each run's start-up benchmark measured
        assert {k: v for k, v in b["generation"].items() if k != "dtype_choice"} == {k: v for k, v in generation.items() if k != "dtype_choice"}
    for name in names:
        if a[name] is None:
            assert b[name] is None, name
        else:
            assert b[name] == pytest.approx(a[name], abs=TOLERANCE), name


@pytest.fixture(scope="module")
def concare_one(tmp_path_factory, session_cache) -> Path:
    root = tmp_path_factory.mktemp("concare-1")
    _ok("fit", *CONCARE, "--trainer.default_root_dir", str(root), cache=session_cache)
    return root


def test_concare_ddp_fit_resumed_under_ddp_matches_one_process(concare_one, tmp_path, session_cache):
    args = ["fit", *CONCARE, *DDP, "--data.init_args.batch_size", "16", "--trainer.default_root_dir", str(tmp_path)]
    _ok(*args, "--trainer.max_epochs", "1", cache=session_cache)
    _ok(*args, "--ckpt_path", "last", cache=session_cache)  # resumed under DDP to the configured 2 epochs
    assert_same(tmp_path, concare_one, skip=("train/decov",))  # DeCov: a per-rank batch statistic (weight 0 here)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # written once
    # the model's outputs, not its raw weights: the attention's key bias gets a gradient that is zero but for
    # rounding (softmax ignores a shift), which Adam scales up to steps of size lr in either run
    assert_same_export(tmp_path / "expert_attention.jsonl", concare_one / "expert_attention.jsonl")


def assert_same_export(got: Path, want: Path, tolerance: float = 1e-5) -> None:
    """The same patients, probabilities and attention weights (the file rounds to 6 decimals)."""
    rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (got, want)]
    assert len(rows[0]) == len(rows[1]) > 0
    for a, b in zip(*rows):
        assert (a["id"], a["split"], a["label"]) == (b["id"], b["split"], b["label"])
        assert abs(a["prob"] - b["prob"]) <= tolerance
        weights = dict(b["features"])
        assert all(abs(w - weights[name]) <= tolerance for name, w in a["features"])


def test_testing_with_two_processes_gives_the_one_process_metrics(concare_one, tmp_path, session_cache):
    best = str(concare_one / "checkpoints/best.ckpt")
    one, two = tmp_path / "one", tmp_path / "two"
    _ok("test", *CONCARE, "--ckpt_path", best, "--trainer.default_root_dir", str(one), cache=session_cache)
    _ok("test", *CONCARE, *DDP, "--ckpt_path", best, "--trainer.default_root_dir", str(two), cache=session_cache)
    metrics = _metrics(two)
    assert metrics["test/auroc"] == _metrics(one)["test/auroc"]  # 199 patients over 2 ranks (one padded), bootstrap after the gather
    assert_same(two, one)


def test_rl_two_ranks_equal_one_process(tmp_path, tjh_expert, session_cache):
    args = [
        "fit", "--config", "configs/tjh/rl.yaml", "--config", "configs/smoke/rl.yaml", "--model.init_args.expert_attention", str(tjh_expert),
        "--trainer.max_epochs", "2", "--data.init_args.train_patients", "2", "--model.init_args.rollout_seed", "0", *PINNED,
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(*args, "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(one), cache=session_cache)
    _ok(*args, *DDP, "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(two), cache=session_cache)
    assert_same(two, one)
    for name in ("train/entropy", "train/eps_high", "train/reward", "train/completion_length"):
        assert name in _metrics(two)
    adapter = "model/adapter/adapter_model.safetensors"
    want, got = load_file(one / adapter), load_file(two / adapter)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=TOLERANCE, rtol=0, msg=name)


DISTILL = ["predict", "--config", "configs/tjh/distill.yaml", "--config", "configs/smoke/distill.yaml", "--model.init_args.search.rollouts", "3", *PINNED]


def test_distillation_on_two_ranks_merges_into_the_one_process_file(tmp_path, tjh_expert, session_cache):
    expert = ["--model.init_args.expert_attention", str(tjh_expert)]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(*DISTILL, *expert, "--trainer.limit_predict_batches", "4", "--trainer.default_root_dir", str(one), cache=session_cache)
    args = [*DISTILL, *expert, *DDP, "--trainer.limit_predict_batches", "2", "--trainer.default_root_dir", str(two)]
    run_and_kill(args, session_cache, two / "trajectories.jsonl.part0.done", changes=1)  # rank 0 finished 1 of its 4 batches
    assert not (two / "trajectories.jsonl").exists() and (two / "trajectories.jsonl.part0").exists()
    _ok(*args, cache=session_cache)  # each rank resumes its part, then rank 0 merges
    assert (two / "trajectories.jsonl").read_bytes() == (one / "trajectories.jsonl").read_bytes()
    assert sorted((two / "trajectories.jsonl.done").read_text().split()) == sorted((one / "trajectories.jsonl.done").read_text().split())
    assert not list(two.glob("trajectories.jsonl.part*"))  # merged: no part left


def test_sft_on_two_ranks_gives_the_one_process_test_metrics(tmp_path, tjh_expert, session_cache):
    """SFT's loss is a token mean per rank, averaged by DDP (as in TRL and the HF Trainer): train and val
    loss differ from one process's by the ranks' token counts (within 1e-3 relative). The answers, and so
    every test metric, are the same."""
    distilled = tmp_path / "distill"
    _ok(*DISTILL, "--model.init_args.expert_attention", str(tjh_expert), "--trainer.default_root_dir", str(distilled), cache=session_cache)
    args = [
        "fit", "--config", "configs/tjh/sft.yaml", "--config", "configs/smoke/sft.yaml", "--trainer.max_epochs", "2",
        "--data.init_args.trajectories", str(distilled / "trajectories.jsonl"), "--model.init_args.expert_attention", str(tjh_expert), *PINNED,
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(*args, "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(one), cache=session_cache)
    _ok(*args, *DDP, "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(two), cache=session_cache)
    assert_same(two, one, skip=("train/loss", "val/loss"))
    for name in ("train/loss_epoch", "val/loss"):
        assert _metrics(two)[name] == pytest.approx(_metrics(one)[name], rel=1e-3), name
    assert sorted(p.name for p in (two / "model").iterdir()) == ["adapter", "merged"]


def test_a_prompting_baseline_on_two_ranks_gives_the_one_process_metrics(tmp_path, tjh_expert, session_cache):
    args = [
        "test", "--config", "configs/tjh/prompting_vanilla.yaml", "--config", "configs/smoke/prompting.yaml",
        "--model.init_args.expert_attention", str(tjh_expert), "--data.init_args.eval_patients", "8", "--trainer.limit_test_batches", "null", *PINNED,
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(*args, "--trainer.default_root_dir", str(one), cache=session_cache)
    _ok(*args, *DDP, "--trainer.default_root_dir", str(two), cache=session_cache)
    assert _metrics(two)["test/samples"] == 8.0
    assert_same(two, one)
    assert (two / "generations.jsonl").read_text() == (one / "generations.jsonl").read_text()  # gathered, in dataset order
