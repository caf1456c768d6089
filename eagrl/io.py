"""Atomic file writing, and the checks a checkpoint or weights file passes before it is loaded.

Writing: to a temporary name in the same folder, then rename. A reader never sees a half-written file; an
interrupted write leaves the previous file intact.

Checks: ``check_checkpoint`` (a complete archive), ``check_weights_only`` (tensors and plain values only,
safe to unpickle), ``check_safetensors`` (a complete safetensors file); ``last_checkpoints`` lists the
files ``--ckpt_path last`` may load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import lightning as L


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is a complete ``torch.save`` archive; else raise one clear error.

    Every member's CRC is checked, so a checkpoint cut short by a kill or a full disk is reported
    instead of half-loaded.
    """
    import zipfile

    from eagrl.errors import EAGRLInputError

    path = Path(path)
    if not path.is_file():
        raise EAGRLInputError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        damaged = str(err) or type(err).__name__
    if damaged is not None:
        raise EAGRLInputError(
            f"checkpoint {path} is truncated or damaged ({damaged}): it was not loaded. Delete it to start over, "
            "or pass another --ckpt_path (checkpoints are written under a temporary name and renamed, so an "
            "interrupted save leaves the previous one intact)"
        )
    return path


def check_weights_only(path: Path) -> None:
    """Refuse a checkpoint that holds anything but tensors and plain values (unpickling it could run code)."""
    import pickle

    import torch

    from eagrl.errors import EAGRLInputError

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):
            raise EAGRLInputError(
                f"checkpoint {path} holds objects other than tensors and plain values, so it was not loaded "
                f"(torch.load(weights_only=True): {first}). Pass --weights_only false only for a file you trust"
            ) from None
        raise EAGRLInputError(f"checkpoint {path} is not a PyTorch checkpoint that can be read ({first})") from None


def last_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The files ``--ckpt_path last`` may load: every ``last*.ckpt`` of the checkpoint folders."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    return sorted(p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt") if p.is_file())


def check_safetensors(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` if its safetensors header is readable and the file holds every tensor it lists."""
    import struct

    from eagrl.errors import EAGRLInputError

    path = Path(path)
    problem = None
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"a header that is a {type(header).__name__}, not an object")
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            problem = f"{size} bytes, its header lists {8 + length + max(ends)}"
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        problem = str(err) or type(err).__name__
    if problem is not None:
        raise EAGRLInputError(f"{what}: {path} is not a complete safetensors file ({problem})")
    return path
