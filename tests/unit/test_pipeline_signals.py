"""A stage of ``eagrl.pipeline`` does not outlive the pipeline: a SIGTERM or SIGHUP to it reaches the running stage,
which gets a grace to stop before it is killed; a Ctrl-C waits for the stage the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eagrl.paths import REPO_ROOT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stage(pid_file: Path, marker: Path, ignores: str = "", stops_after_s: float = 0.0) -> str:
    """A stage that writes its pid, then would run for two minutes (as a long fit writing into its run folder would).
    ``ignores``: a signal it ignores (Lightning's predict loop swallows SIGTERM); ``stops_after_s``: on SIGTERM or
    SIGINT it takes that long to stop, then writes ``marker`` (a fit finishing its batch)."""
    lines = ["import os, signal, sys, time"]
    if stops_after_s:
        lines += [f"def stop(signum, frame):\n    time.sleep({stops_after_s}); open({str(marker)!r}, 'w').write('stopped'); sys.exit(0)",
                  "signal.signal(signal.SIGTERM, stop)", "signal.signal(signal.SIGINT, stop)"]  # fmt: skip
    if ignores:
        lines.append(f"signal.signal(signal.{ignores}, signal.SIG_IGN)")
    lines += [f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))", "time.sleep(120)"]
    return "\n".join(lines)


def _start(tmp_path: Path, stage: str, grace_s: float, before: str = "") -> tuple[subprocess.Popen, int]:
    """The pipeline's launcher in a process of its own, running ``stage``; returns it and the stage's pid. SIGHUP and
    SIGINT start at their defaults, whatever the test run inherited (under ``nohup``, or started with ``&`` by a
    script, they are ignored); ``before`` may set them otherwise."""
    defaults = "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); signal.signal(signal.SIGINT, signal.default_int_handler); "
    pipeline = (f"{defaults}{before}import sys; from eagrl.pipeline import run_stage; "
                f"print(run_stage([sys.executable, '-c', {stage!r}], grace_s={grace_s}))")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", pipeline], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "stage.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return parent, int(pid_file.read_text())


def _cleanup(parent: subprocess.Popen, stage_pid: int) -> None:
    parent.kill()
    if _alive(stage_pid):
        os.kill(stage_pid, signal.SIGKILL)


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.mark.parametrize(
    "signum, ignores", [(signal.SIGTERM, ""), (signal.SIGHUP, ""), (signal.SIGTERM, "SIGTERM")],
    ids=["SIGTERM", "SIGHUP", "SIGTERM-to-a-stage-that-ignores-it"],
)
def test_a_signal_to_the_pipeline_stops_its_running_stage(tmp_path: Path, signum: int, ignores: str):
    parent, stage_pid = _start(tmp_path, _stage(tmp_path / "stage.pid", tmp_path / "marker", ignores), grace_s=1.0)
    try:
        parent.send_signal(signum)
        out, _ = parent.communicate(timeout=30)
        code, stopped_by = eval(out.strip())
        assert stopped_by == signum  # the pipeline waited for its stage and knows why it stopped
        assert code == (-signal.SIGKILL if ignores else -signum)  # one that ignores it is killed after the grace
        assert _gone(stage_pid), "the stage outlived the pipeline"
    finally:
        _cleanup(parent, stage_pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_stage_gets_its_grace_to_stop(tmp_path: Path, signum: int):
    """A stage that takes 1 s to stop (a fit finishing its batch) is not killed before: its marker is written.
    (``subprocess.run``, used before, killed it 0.25 s after a Ctrl-C.)"""
    marker = tmp_path / "marker"
    parent, stage_pid = _start(tmp_path, _stage(tmp_path / "stage.pid", marker, stops_after_s=1.0), grace_s=10.0)
    try:
        if signum == signal.SIGINT:  # a terminal's Ctrl-C reaches the whole process group
            os.kill(stage_pid, signal.SIGINT)
        parent.send_signal(signum)
        _, err = parent.communicate(timeout=30)
        assert marker.read_text() == "stopped"
        assert _gone(stage_pid)
        if signum == signal.SIGINT:
            assert "KeyboardInterrupt" in err
    finally:
        _cleanup(parent, stage_pid)


def test_an_interrupt_of_the_pipeline_alone_stops_its_stage_after_the_grace(tmp_path: Path):
    """SIGINT to the pipeline's process only: the stage, here one that ignores SIGINT, is killed after the grace and
    the pipeline stops with KeyboardInterrupt."""
    parent, stage_pid = _start(tmp_path, _stage(tmp_path / "stage.pid", tmp_path / "marker", "SIGINT"), grace_s=1.0)
    try:
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=30)
        assert parent.returncode != 0 and "KeyboardInterrupt" in err
        assert _gone(stage_pid), "the stage outlived the pipeline"
    finally:
        _cleanup(parent, stage_pid)


def test_a_hangup_the_pipeline_ignores_is_not_passed_on(tmp_path: Path):
    """Under ``nohup`` (SIGHUP ignored) a closed terminal stops nothing: the stage runs on."""
    before = "import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    parent, stage_pid = _start(tmp_path, _stage(tmp_path / "stage.pid", tmp_path / "marker"), grace_s=0.5, before=before)
    try:
        parent.send_signal(signal.SIGHUP)
        time.sleep(2.0)  # four graces
        assert parent.poll() is None and _alive(stage_pid)
    finally:
        _cleanup(parent, stage_pid)


def test_a_stage_that_ends_by_itself_gives_its_exit_code():
    from eagrl.pipeline import run_stage

    assert run_stage([sys.executable, "-c", "import sys; sys.exit(3)"]) == (3, None)
    assert run_stage([sys.executable, "-c", "pass"]) == (0, None)
