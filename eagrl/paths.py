"""Where the shared data and the caches live.

The shared data folder is ``../shared/data`` next to the repository root, unless the environment
variable ``EAGRL_DATA_DIR`` or an explicit config value says otherwise (config wins over env).
Caches default to ``$EAGRL_CACHE_DIR`` or ``$XDG_CACHE_HOME/eagrl`` (``~/.cache/eagrl``).
"""

from __future__ import annotations

import os
from pathlib import Path

from eagrl.errors import EAGRLInputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``override``, else ``$EAGRL_DATA_DIR``, else ``<repo>/../shared/data``."""
    if override:
        path, origin = Path(override).expanduser(), "the config value data_dir"
    elif os.environ.get("EAGRL_DATA_DIR"):
        path, origin = Path(os.environ["EAGRL_DATA_DIR"]).expanduser(), "the environment variable EAGRL_DATA_DIR"
    else:
        path, origin = REPO_ROOT.parent / "shared" / "data", "the default location ../shared/data"
    if not path.is_dir():
        raise EAGRLInputError(f"data folder {path} (from {origin}) does not exist or is not a folder")
    return path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The root of eagrl's caches (preprocessed datasets, converted model weights)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("EAGRL_CACHE_DIR"):
        return Path(os.environ["EAGRL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "eagrl"


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise one clear error saying what it should have been."""
    if not path.is_file():
        raise EAGRLInputError(f"{what}: file {path} does not exist")
    return path
