"""Every W&B sweep in configs/sweeps drives the real CLI: its config exists, every parameter is a valid
CLI key, one sampled configuration parses, and its metric is one the runs log."""

from __future__ import annotations

import math

import pytest
import yaml

from eagrl.cli import main
from tests.conftest import REPO

SWEEPS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs/sweeps").glob("*.yaml"))
LOGGED = {  # metrics each module logs (checked by the stage tests)
    "lightning_modules.ConCareModule": {"val/auprc", "val/auroc", "test/auroc", "test/auprc", "train/loss"},
    "lightning_modules.SFTModule": {"val/loss", "train/loss", "test/auroc", "test/auprc", "val/auroc"},
    "lightning_modules.RLModule": {"test/auroc", "test/auprc", "train/reward", "train/reward_epoch"},
}


def _sample(spec: dict):
    if "values" in spec:
        return spec["values"][0]
    if "value" in spec:
        return spec["value"]
    return math.sqrt(spec["min"] * spec["max"]) if "log" in spec.get("distribution", "") else (spec["min"] + spec["max"]) / 2


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_parameters_are_cli_keys_and_a_sample_parses(sweep, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    spec = yaml.safe_load((REPO / sweep).read_text())
    command = spec["command"]
    assert command[:4] == ["python", "-m", "eagrl", "fit"] and "${args}" in command
    config = command[command.index("--config") + 1]
    assert (REPO / config).is_file()
    sampled = {key: _sample(value) for key, value in spec["parameters"].items()}
    args = [a for a in command[3:] if a not in ("${args}",)] + [f"--{k}={v}" for k, v in sampled.items()]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--print_config"])
    out = capsys.readouterr()
    assert not stop.value.code, out.err[-2000:]
    printed = yaml.safe_load(out.out)
    for key, value in sampled.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value) if isinstance(value, float) else node == value, key
    assert spec["metric"]["name"] in LOGGED[printed["model"]["class_path"]]
