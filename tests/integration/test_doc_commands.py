"""Commands that cannot rot: every ``python -m eagrl <subcommand> ... --config ...`` written in the README or in
``docs/`` is parsed with ``--print_config``, so a renamed key or config file fails the suite. Commands holding a
placeholder (``PLACEHOLDERS``) are skipped explicitly, and the test checks that exactly those were skipped."""

from __future__ import annotations

import re
import shlex

import pytest

from eagrl.cli import main
from tests.conftest import REPO

SUBCOMMANDS = ("fit", "validate", "test", "predict", "summary")
PLACEHOLDERS = ("/path/to", "/data/", "PATH", "DIR", "other_hospital", "<", "...")  # a user's own files, not ours
COMMAND = re.compile(r"python -m eagrl (?:" + "|".join(SUBCOMMANDS) + r")\b")


def commands_in(text: str) -> list[str]:
    """The ``python -m eagrl <subcommand>`` commands of a markdown text that name a config: in code blocks (lines
    continued with a backslash joined, comments cut) and in inline code."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            match = COMMAND.search(line)
            if match:
                found.append(line[match.start() :])
    for inline in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        match = COMMAND.search(inline)
        if match:
            found.append(inline[match.start() :])
    return [c for c in found if "--config" in c]


def _documented() -> list[tuple[str, str]]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [(page.relative_to(REPO).as_posix(), command) for page in pages for command in commands_in(page.read_text())]


DOCUMENTED = _documented()
RUNNABLE = [(page, c) for page, c in DOCUMENTED if not any(p in c for p in PLACEHOLDERS)]


def _parse(command: str, capsys) -> tuple[int, str]:
    args = shlex.split(command)[3:]  # after "python -m eagrl"
    with pytest.raises(SystemExit) as stop:
        main([*args, "--print_config"])
    return stop.value.code or 0, capsys.readouterr().err


def test_the_docs_hold_commands_and_placeholders_are_skipped_explicitly():
    assert len(RUNNABLE) >= 25, len(RUNNABLE)
    skipped = [c for _, c in DOCUMENTED if (_, c) not in RUNNABLE]
    assert all(any(p in c for p in PLACEHOLDERS) for c in skipped)


@pytest.mark.slow
@pytest.mark.parametrize("page, command", RUNNABLE, ids=[f"{p}:{k}" for k, (p, _) in enumerate(RUNNABLE)])
def test_a_documented_command_parses(page, command, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    code, err = _parse(command, capsys)
    assert code == 0, f"{page}: `{command}` no longer parses:\n{err[-1500:]}"


def test_a_renamed_key_in_a_snippet_fails(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    snippet = "```bash\npython -m eagrl fit --config configs/tjh/concare.yaml \\\n  --model.init_args.hidden_size 64   # renamed: hidden\n```\n"
    (command,) = commands_in(snippet)
    assert command == "python -m eagrl fit --config configs/tjh/concare.yaml --model.init_args.hidden_size 64"
    code, err = _parse(command, capsys)
    assert code == 2 and "hidden_size" in err
    moved = "`python -m eagrl test --config configs/tjh/concare_renamed.yaml`"
    code, err = _parse(commands_in(moved)[0], capsys)
    assert code == 2 and "concare_renamed.yaml" in err


@pytest.mark.slow
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    """``make docs``: ``mkdocs build --strict`` (a broken link or anchor fails)."""
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "own-data" / "index.html").is_file()
