"""A batch of EHR samples: ``collate_samples`` pads a list of ``EHRDataset`` items into one dict of tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of samples to the longest one (right padding).

    Returns x [B, T, F] float32 (0 in padding), missing [B, T, F] bool (True in padding),
    mask [B, T] bool (True on real days), lengths [B] int64, days [B, T] int64,
    demographics [B, D] float32, label [B] float32, raw [B, T, F] float32 (NaN in padding), id list[str],
    index [B] int64 (positions in the split's dataset, for ``EHRDataset.text``).
    """
    batch, longest = len(items), max(len(item["x"]) for item in items)
    n_features = items[0]["x"].shape[1]
    x = torch.zeros(batch, longest, n_features)
    missing = torch.ones(batch, longest, n_features, dtype=torch.bool)
    raw = torch.full((batch, longest, n_features), float("nan"))
    days = torch.zeros(batch, longest, dtype=torch.long)
    lengths = torch.tensor([len(item["x"]) for item in items])
    for b, item in enumerate(items):
        t = len(item["x"])
        x[b, :t] = torch.from_numpy(item["x"])
        missing[b, :t] = torch.from_numpy(item["missing"])
        raw[b, :t] = torch.from_numpy(item["raw"])
        days[b, :t] = torch.from_numpy(item["days"].astype(np.int64))
    return {
        "id": [item["id"] for item in items],
        "index": torch.tensor([item.get("index", -1) for item in items]),
        "split": [item.get("split", "") for item in items],
        "x": x,
        "missing": missing,
        "mask": torch.arange(longest)[None, :] < lengths[:, None],
        "lengths": lengths,
        "days": days,
        "demographics": torch.from_numpy(np.stack([item["demographics"] for item in items])),
        "label": torch.tensor([item["label"] for item in items]),
        "raw": raw,
    }
