"""A stage of ``eagrl.pipeline`` does not outlive the pipeline: a SIGTERM or SIGHUP to it reaches the running stage."""

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


@pytest.mark.parametrize(
    "signum, ignores", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGHUP", "SIGTERM-to-a-stage-that-ignores-it"],
)
def test_a_signal_to_the_pipeline_stops_its_running_stage(tmp_path: Path, signum: int, ignores: bool):
    pid_file = tmp_path / "stage.pid"
    # the stage: writes its pid, then would run for two minutes (as a long fit writing into its run folder would);
    # ignores: as Lightning's predict loop, which swallows SIGTERM, so the pipeline kills it after the grace
    ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignores else ""
    stage = f"{ignore}import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    pipeline = (
        "import sys; from eagrl.pipeline import run_stage; "
        f"print(run_stage([sys.executable, '-c', {stage!r}], grace_s=1.0))"
    )
    parent = subprocess.Popen([sys.executable, "-c", pipeline], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    try:
        parent.send_signal(signum)
        out, _ = parent.communicate(timeout=30)
        assert out.strip() == str(-signum)  # the pipeline waited for its stage and knows why it stopped
        deadline = time.monotonic() + 10
        while _alive(stage_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(stage_pid), "the stage outlived the pipeline"
    finally:
        parent.kill()
        if _alive(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)


def test_an_interrupt_of_the_pipeline_alone_stops_its_stage_after_the_grace(tmp_path: Path):
    """SIGINT to the pipeline's process only (a terminal's Ctrl-C reaches the stage too): the stage, here one that
    ignores SIGINT, is killed after the grace and the pipeline stops with KeyboardInterrupt."""
    pid_file = tmp_path / "stage.pid"
    stage = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    pipeline = f"import sys; from eagrl.pipeline import run_stage; run_stage([sys.executable, '-c', {stage!r}], grace_s=1.0)"
    parent = subprocess.Popen([sys.executable, "-c", pipeline], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stage_pid = int(pid_file.read_text())
    try:
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=30)
        assert parent.returncode != 0 and "KeyboardInterrupt" in err
        assert not _alive(stage_pid), "the stage outlived the pipeline"
    finally:
        parent.kill()
        if _alive(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)


def test_a_stage_that_ends_by_itself_gives_its_exit_code():
    from eagrl.pipeline import run_stage

    assert run_stage([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert run_stage([sys.executable, "-c", "pass"]) == 0
