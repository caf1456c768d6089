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
        self.done = self.finished()
        if self.done_path.is_file():
            with atomic_path(self.done_path) as tmp:
                Path(tmp).write_text("".join(f"{i}\n" for i in sorted(self.done)))
        lines = _complete_lines(self.path)
        kept = [line for line, _ in self._finished_lines(self.done)]
        if self.path.is_file() and (len(kept) != len(lines) or not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size):
            with atomic_path(self.path) as tmp:
                Path(tmp).write_text("".join(line + "\n" for line in kept))
        return set(self.done)

    def finished(self) -> set[str]:
        """The patients marked done (read only: another process may be writing this store)."""
        return {line.strip() for line in _complete_lines(self.done_path) if line.strip()}

    def _finished_lines(self, done: set[str]) -> list[tuple[str, dict[str, Any]]]:
        """``(line, record)`` of every complete, readable line of a patient in ``done``, in file order."""
        out = []
        for line in _complete_lines(self.path):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if str(record.get("id")) in done:
                out.append((line, record))
        return out

    def records(self) -> list[dict[str, Any]]:
        """The complete, readable lines of finished patients, in file order (read only)."""
        return [record for _, record in self._finished_lines(self.finished())]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.done_path.unlink(missing_ok=True)

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


def merge_stores(final: TrajectoryStore, parts: list[TrajectoryStore], order: dict[str, tuple]) -> None:
    """Merge the per-rank ``parts`` into ``final``: every finished patient once, patients sorted by
    ``order[id]`` (unknown ids last), each patient's lines in their order. ``final`` and its done list
    are replaced atomically before the parts are removed, so an interrupted merge can be run again."""
    done: set[str] = set()
    lines: dict[str, list[dict[str, Any]]] = {}
    for store in [final, *parts]:
        finished = store.finished()
        by_patient: dict[str, list[dict[str, Any]]] = {}
        for record in store.records():
            by_patient.setdefault(str(record["id"]), []).append(record)
        for patient in finished - done:
            lines[patient] = by_patient.get(patient, [])
        done |= finished
    ranked = sorted(done, key=lambda i: (0, order[i]) if i in order else (1, (i,)))
    with atomic_path(final.path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for i in ranked for r in lines[i]), encoding="utf-8")
    with atomic_path(final.done_path) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for i in ranked))
    for store in parts:
        store.remove()
