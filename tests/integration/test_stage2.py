"""Stage 2 through the real CLI on a tiny random model: a fit that writes its files, resuming from the
last checkpoint, every variant overlay on every RL config, and bad settings stopping before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eagrl.cli import main
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

RL_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*/rl*.yaml") if p.parent.name not in ("smoke", "rl", "reproduce", "sweeps"))
VARIANTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs/rl").glob("*.yaml"))
SMOKE = ["--config", "configs/tjh/rl.yaml", "--config", "configs/smoke/rl.yaml"]


def _fit(tmp_path: Path, expert: Path, cache: Path, *extra: str):
    return run_cli(
        "fit", *SMOKE, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.expert_attention", str(expert), *extra,
        cache=cache,
    )  # fmt: skip


@pytest.mark.slow
def test_rl_fit_then_resume(tmp_path, tjh_expert, session_cache):
    result = _fit(tmp_path, tjh_expert, session_cache, "--model.init_args.compile_loss", "true")  # the loss under torch.compile
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("train/reward", "train/r_cls", "train/r_att", "train/parse_rate", "train/entropy", "train/clip_low",
                 "train/clip_high", "train/kl", "train/completion_length", "train/step_time", "train/eps_high", "test/auroc",
                 "train/logp_mismatch", "train/groups_varied"):  # fmt: skip
        assert name in metrics, name
    assert 0.2 <= metrics["train/eps_high"] <= 0.4 and 0.0 <= metrics["train/groups_varied"] <= 1.0
    assert 0.0 <= metrics["train/logp_mismatch"] < 1e-3  # fp32 sampler and training forward: the same numbers
    assert metrics["generation"]["rollout_batch_size"] >= 1
    assert metrics["train/steps"] == 2  # 2 patients x G = 3 in mini-batches of 3: 2 optimiser steps per rollout
    for path in ("model/adapter/adapter_config.json", "model/merged/model.safetensors", "generations.jsonl", "checkpoints/last.ckpt"):
        assert (tmp_path / path).is_file(), path
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4 and "RandomState" in checkpoint["callbacks"]  # Lightning counts optimiser steps: 2 per rollout
    assert all("lora" in k for k in checkpoint["state_dict"])  # the trainable weights only
    steps = [s["step"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert steps and all(int(s) == 4 for s in steps)  # 2 rollouts x 2 mini-batch steps
    spent = metrics["train/generated_tokens"]  # the running total of completion tokens, saved with the checkpoint
    assert spent == metrics["generation"]["rollouts"]["generated_tokens"] == checkpoint["eagrl_generated_tokens"] > 0

    resumed = _fit(tmp_path, tjh_expert, session_cache, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"), "--trainer.max_epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8 and checkpoint["epoch"] == 1
    assert checkpoint["eagrl_generated_tokens"] > spent  # the running total carried on from the checkpoint
    steps = [s["step"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert all(int(s) == 8 for s in steps)  # AdamW's state carried on, not restarted


@pytest.mark.slow
def test_the_token_budget_ends_the_fit(tmp_path, tjh_expert, session_cache):
    """2 epochs are 4 rollouts (8 optimiser steps); a budget of 1 generated token ends the fit after the first rollout."""
    quick = ["--model.init_args.test_after_fit", "false", "--model.init_args.save_merged", "false", "--trainer.max_epochs", "2"]
    result = _fit(tmp_path, tjh_expert, session_cache, *quick, "--model.init_args.max_generated_tokens", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["eagrl_generated_tokens"] >= 1


@pytest.mark.parametrize("config", RL_CONFIGS)
@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_every_variant_overlay_parses_on_every_rl_config(config, variant, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    overlay = ["--config", variant] if variant else []
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", config, *overlay, "--print_config"])
    out = capsys.readouterr()
    assert not stop.value.code, out.err[-2000:]
    assert "class_path: lightning_modules.RLModule" in out.out
    if variant and variant.endswith(("grpo.yaml", "dapo.yaml", "no_attention_reward.yaml")):
        assert "use_attention: false" in out.out and "lam: 0.6" in out.out  # merged, not replaced


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--model.init_args.backbone.name", "runs/nowhere/sft/model/merged"], {}, "does not exist: stage 2 starts from the stage-1 model"),
        (["--model.init_args.group_size", "1"], {}, "group_size must be >= 2"),
        (["--model.init_args.eps_min", "0.5", "--model.init_args.eps_max", "0.3"], {}, "must not exceed"),
        (["--model.init_args.loss_backend", "triton"], {"TRITON_INTERPRET": "0"}, "backend 'triton' cannot run here"),
    ],
)
def test_bad_settings_stop_before_training(tmp_path, tjh_expert, session_cache, extra, env, message):
    result = run_cli(
        "fit", *SMOKE, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.expert_attention", str(tjh_expert), *extra,
        cache=session_cache, env=env,
    )  # fmt: skip
    if torch.cuda.is_available() and "triton" in extra:
        pytest.skip("a GPU runs the kernels")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
