"""Shared fixtures: offline, W&B off, the real shipped data, and a per-session preprocessing cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_root() -> Path:
    from eagrl.paths import data_dir

    return data_dir()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eagrl-cache")


@pytest.fixture(scope="session")
def tjh_module(session_cache):
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="tjh", cache_dir=str(session_cache), progress=False)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def mimic_module(session_cache):
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="mimic_iv", task="mortality", cache_dir=str(session_cache), progress=False)
    dm.prepare_data()
    dm.setup()
    return dm


def run_cli(*args: str, cache: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m eagrl ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["EAGRL_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "eagrl", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
