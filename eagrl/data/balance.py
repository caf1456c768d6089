"""Patient balancing: as many positive as negative patients, by a seeded subsample of the majority class."""

from __future__ import annotations

import random
from typing import Any, Sequence


def balance_patients(records: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Keep as many positive as negative patients (all lines of a kept patient), dropping a seeded random
    subset of the majority class's patients. ``records`` need ``id`` and ``label``."""
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for record in records:
        ids = by_label[int(record["label"])]
        if record["id"] not in ids:
            ids.append(record["id"])
    n = min(len(by_label[0]), len(by_label[1]))
    rng = random.Random(seed)
    keep = set(rng.sample(by_label[0], n)) | set(rng.sample(by_label[1], n))
    return [record for record in records if record["id"] in keep]
