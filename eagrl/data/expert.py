"""Read the expert signal: ``expert_attention.jsonl`` written by the ConCare run (one line per patient)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from eagrl.errors import EAGRLInputError


def load_expert_attention(
    path: str | Path, feature_names: Iterable[str], needed_ids: Iterable[str] = (), top_k: Optional[int] = None
) -> dict[str, list[str]]:
    """``{sample id: the expert's top features}``: the file's ``top_k`` list, or its first ``top_k`` ranked
    features when ``top_k`` is given. Stops with one clear error when the file is missing or malformed,
    names features the data does not have, or lacks any of ``needed_ids`` (an export of another
    dataset or task)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EAGRLInputError(
            f"expert attention file {path} does not exist: train the expert first "
            "(`make concare`, or `python -m eagrl fit --config configs/<dataset>/concare*.yaml`)"
        )
    known = set(feature_names)
    top: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ranked = [name for name, _ in record["features"]]
                chosen = ranked[:top_k] if top_k else list(record["top_k"])
                sample = str(record["id"])
            except (ValueError, KeyError, TypeError) as err:
                raise EAGRLInputError(
                    f"{path}, line {number}: not an expert attention record (expected JSON with id, features, top_k): {err}"
                ) from None
            unknown = [name for name in ranked if name not in known]
            if unknown:
                raise EAGRLInputError(
                    f"{path}, line {number}: features {unknown[:5]} are not in this dataset: "
                    "the file comes from another dataset (or feature set)"
                )
            top[sample] = chosen
    missing = [i for i in needed_ids if str(i) not in top]
    if missing:
        raise EAGRLInputError(
            f"{path} has no expert attention for {len(missing)} of the samples asked for: "
            "it was made for another dataset, task or split"
        )
    return top
