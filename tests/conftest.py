"""Shared fixtures: offline, W&B off, the real shipped data, and a per-session preprocessing cache."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):  # no GPU: the Triton kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

# make test runs pytest-xdist workers (WORKERS, one test file each at a time): one thread each, and so their processes
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Under xdist: the files holding slow tests first (keeping their order), so the two workers start on the long files
    and the short ones fill the end. ``--no-loadscope-reorder`` (the Makefile) makes xdist hand files out in this order
    instead of by their number of tests, which put the long files with few tests last: one worker ran them alone."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the same order on every worker (xdist checks it)
        slow = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0]))


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


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The embedded SmolLM2 tokenizer, loaded once for the whole run (left padding, as generation needs it)."""
    from eagrl.models.backbone import BackboneOptions, embedded_tokenizer

    tok = embedded_tokenizer(BackboneOptions(cache_dir=str(tmp_path_factory.mktemp("models"))))
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """A tiny random Llama with the embedded tokenizer's vocabulary (seed 0, eval mode), shared by the whole run:
    tests read it, never train it."""
    from eagrl.models.backbone import tiny_random_llama

    return tiny_random_llama(tokenizer, seed=0).eval()


@pytest.fixture()
def tjh_copy(tmp_path, data_root) -> Path:
    """A private copy of the TJH files to damage (pytest's temp dir; never committed)."""
    import shutil

    root = tmp_path / "data"
    for rel in ("tjh/raw/time_series_375_prerpocess_en.xlsx", "tjh/splits/tjh_clinicrealm_split_ids.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_root / rel, root / rel)
    return root


def run_cli(*args: str, cache: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m eagrl ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    if cache is not None:
        full_env["EAGRL_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "eagrl", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tjh_expert(tmp_path_factory, tjh_module) -> Path:
    """An expert attention file for every TJH sample, made by code (seeded random rankings)."""
    names = tjh_module.feature_names[2:]  # the dynamic features
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("expert") / "expert_attention.jsonl"
    with open(path, "w") as handle:
        for split, data in tjh_module.datasets.items():
            for i in range(len(data)):
                ranked = rng.sample(names, len(names))
                weights = sorted((rng.random() for _ in ranked), reverse=True)
                record = {"id": data[i]["id"], "split": split, "label": int(data[i]["label"]), "prob": 0.5}
                record.update(features=[[n, w] for n, w in zip(ranked, weights)], top_k=ranked[:5])
                handle.write(json.dumps(record) + "\n")
    return path
