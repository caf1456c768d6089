"""Shared fixtures: offline, W&B off, the real shipped data, and a per-session preprocessing cache."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import traceback
import warnings
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


def run_cli(
    *args: str, cache: Path | None = None, env: dict | None = None, timeout: int = 600, fresh_process: bool = False
) -> subprocess.CompletedProcess:
    """Run ``python -m eagrl ARGS`` as a user would and return its exit code, stdout and stderr.

    By default the command runs in this process (``eagrl.cli.main``), which saves the ~5 s of imports a new Python
    pays: its printed output, warnings and Lightning's log lines are captured, and the environment (with ``cache``
    as ``EAGRL_CACHE_DIR`` and ``env``) and working directory are set for it and restored after. ``fresh_process``:
    a new ``python -m eagrl`` process, for what needs one (a run that is killed, several ranks, W&B, the entry point
    itself); only then does ``timeout`` apply."""
    extra = {**(env or {}), **({"EAGRL_CACHE_DIR": str(cache)} if cache is not None else {})}
    if fresh_process:
        return subprocess.run(
            [sys.executable, "-m", "eagrl", *args], cwd=REPO, env={**os.environ, **extra}, capture_output=True, text=True, timeout=timeout
        )
    return _run_in_process(list(args), extra)


@contextlib.contextmanager
def _as_a_new_process(args: list[str], extra_env: dict):
    """Set what a new ``python -m eagrl ARGS`` process would start from (its command line, environment, working
    directory), and put back after it what a run may change here (``seed_everything``, ``deterministic: true``)."""
    import numpy as np
    import torch

    saved = (dict(os.environ), os.getcwd(), sys.argv, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(), torch.get_rng_state(),
             random.getstate(), np.random.get_state())  # fmt: skip
    try:
        os.environ.update(extra_env)
        os.chdir(REPO)
        sys.argv = ["python -m eagrl", *args]  # read by the CLI as a new process reads its command line
        yield
    finally:
        env, cwd, sys.argv, deterministic, warn_only, threads, torch_rng, python_rng, numpy_rng = saved
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


@contextlib.contextmanager
def _stderr_of_a_new_process(err: io.StringIO):
    """Warnings (a new interpreter's filters) and log lines go to ``err``: Lightning's loggers hold the stream they were
    given at import, and a new process's other warnings reach stderr through logging's last resort, which pytest's
    capture handler on the root logger replaces here."""
    handlers = [
        h for name in ("lightning", "lightning.pytorch", "lightning.fabric") for h in logging.getLogger(name).handlers
        if isinstance(h, logging.StreamHandler)
    ]  # fmt: skip
    streams = [h.stream for h in handlers]
    last_resort = logging.StreamHandler(err)
    last_resort.setLevel(logging.WARNING)
    try:
        for handler in handlers:
            handler.setStream(err)
        logging.getLogger().addHandler(last_resort)
        with contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line)
            )
            yield
    finally:
        logging.getLogger().removeHandler(last_resort)
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)


def _run_in_process(args: list[str], extra_env: dict) -> subprocess.CompletedProcess:
    from eagrl.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _as_a_new_process(args, extra_env), _stderr_of_a_new_process(err), contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as stop:  # as the interpreter maps it: None 0, an int itself, anything else printed and 1
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if stop.code is not None and not isinstance(stop.code, int):
                err.write(f"{stop.code}\n")
        except Exception:  # what an uncaught error does to a process: its traceback, exit code 1
            err.write(traceback.format_exc())
            code = 1
    return subprocess.CompletedProcess(["python", "-m", "eagrl", *args], code, out.getvalue(), err.getvalue())


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
