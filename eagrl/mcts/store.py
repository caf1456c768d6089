"""Append-only, crash-safe storage of distilled trajectories: resume skips finished patients.

``trajectories.jsonl`` gets each finished patient's lines in one write, flushed and fsynced; only then
is the patient's id appended to ``trajectories.jsonl.done``. On resume (``recover``), the done list is
read (a torn last line ignored), and the trajectory file is rewritten (temporary file, then rename)
without any line that is torn, unreadable or belongs to a patient not in the done list, so a run killed
at any moment and rerun ends with every patient exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from eagrl.io import atomic_path


def _complete_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n")
    return data[: end + 1].decode("utf-8", errors="replace").splitlines() if end >= 0 else []


class TrajectoryStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done_path = self.path.with_name(self.path.name + ".done")
        self.done: set[str] = set()

    def recover(self) -> set[str]:
        """Load the finished patients and drop whatever an interrupted run left half-written."""
        self.done = {line.strip() for line in _complete_lines(self.done_path) if line.strip()}
        if self.done_path.is_file():
            with atomic_path(self.done_path) as tmp:
                Path(tmp).write_text("".join(f"{i}\n" for i in sorted(self.done)))
        lines = _complete_lines(self.path)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if str(record.get("id")) in self.done:
                kept.append(line)
        if self.path.is_file() and (len(kept) != len(lines) or not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size):
            with atomic_path(self.path) as tmp:
                Path(tmp).write_text("".join(line + "\n" for line in kept))
        return set(self.done)

    def append(self, patient_id: str, records: Iterable[dict[str, Any]]) -> None:
        """Write one finished patient's lines (possibly none), then mark the patient done."""
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with open(self.done_path, "a", encoding="utf-8") as handle:
            handle.write(f"{patient_id}\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done.add(str(patient_id))
