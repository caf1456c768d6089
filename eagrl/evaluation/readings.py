"""A run's saved test answers read each way ŷ can be read, side by side (no generation, no patient data printed).

    python -m eagrl.evaluation.readings runs/tjh/prompting_decomposition [--json out.json]

For each reading of ``eagrl.llm.parsing`` (``final_answer``: evaluation's, the ``<Final Answer>`` span only;
``anywhere``: the older one, also the last number of a completion without the tag; ``strict``: the reward path's)
it gives how many answers it reads, how many of those come from a completion without the tag, and the AUROC and
AUPRC with a 95% percentile bootstrap interval (an unread answer scored as ``unparsed_probability``). It reads
``generations.jsonl`` (each record's ``completion`` and ``label``), so it also tells how far a run evaluated
before ``answer_reading`` existed moved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from eagrl.errors import EAGRLInputError
from eagrl.evaluation.metrics import bootstrap_metrics
from eagrl.llm.parsing import parse_probability, section

READINGS = {"final_answer": {}, "anywhere": {"anywhere": True}, "strict": {"strict": True}}


def answer_reading_of(run: Path) -> Optional[str]:
    """How a run's test answers (``generations.jsonl``) were read, from its ``config.yaml``: ``final_answer``,
    ``anywhere`` (also a config written before ``answer_reading`` existed, or none), or ``token_probability``
    (ŷ is P(yes), read from no text); None for a run without answers."""
    if not (run / "generations.jsonl").is_file():
        return None
    import yaml

    config = run / "config.yaml"
    args = (((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("init_args") or {}) if config.is_file() else {}
    if args.get("scorer") == "token_probability":
        return "token_probability"
    return str(args.get("answer_reading", "anywhere"))


def read_each_way(completions: list[str], labels: list[int], unparsed: float = 0.5, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{reading: {read, untagged, patients, auroc, auroc_ci_low, auroc_ci_high, auprc, ...}} for N completions
    (completions, labels: N each); ``untagged``: answers read from a completion without ``<Final Answer>``."""
    if len(completions) != len(labels) or not completions:
        raise ValueError(f"read_each_way needs one label per completion and at least one: {len(completions)} and {len(labels)}")
    tagged = [section(text, "Final Answer") is not None for text in completions]
    out: dict[str, dict[str, Any]] = {}
    for name, options in READINGS.items():
        y_hat = [parse_probability(text, **options) for text in completions]
        probs = torch.tensor([unparsed if y is None else y for y in y_hat], dtype=torch.float64)
        metrics = bootstrap_metrics(probs, torch.tensor(labels), n_bootstrap, seed)
        out[name] = {
            "patients": len(completions),
            "read": sum(y is not None for y in y_hat),
            "untagged": sum(y is not None and not t for y, t in zip(y_hat, tagged)),
            **{k: metrics[k] for k in ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "auprc_ci_low", "auprc_ci_high")},
        }
    return out


def run_answers(run: Path, read: Callable[[dict[str, Any]], dict[str, Any]], fields: str) -> list[dict[str, Any]]:
    """Each answer of a run's ``generations.jsonl`` through ``read`` (a JSON object -> the record kept); a line that is
    not JSON or lacks a field raises naming its number and ``fields`` (what a line should hold)."""
    path = run / "generations.jsonl"
    if not path.is_file():
        raise EAGRLInputError(f"{path}: no such file (a prompting, SFT or RL run's test answers)")
    records = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(read(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise EAGRLInputError(f"{path} line {k}: expected a JSON object with {fields} ({type(err).__name__}: {err})") from None
    if not records:
        raise EAGRLInputError(f"{path}: no answers")
    return records


def _records(run: Path) -> list[dict[str, Any]]:
    return run_answers(run, lambda r: {"completion": str(r["completion"]), "label": int(r["label"])}, "'completion' and 'label'")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="A run's saved test answers read each way ŷ can be read (AUROC/AUPRC x100, 95% bootstrap interval).")
    parser.add_argument("run", type=Path, help="a run directory holding generations.jsonl")
    parser.add_argument("--unparsed-probability", type=float, default=0.5, help="ŷ of an answer a reading cannot read")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        records = _records(args.run)
    except EAGRLInputError as err:
        raise SystemExit(f"error: {err}") from None
    found = read_each_way([r["completion"] for r in records], [r["label"] for r in records], args.unparsed_probability, args.bootstrap)
    print(f"{args.run}: {len(records)} answers")
    print("| reading | read | of them without the tag | AUROC [95% CI] | AUPRC [95% CI] |\n|---|---|---|---|---|")
    for name, row in found.items():
        auroc = f"{100 * row['auroc']:.1f} [{100 * row['auroc_ci_low']:.1f}, {100 * row['auroc_ci_high']:.1f}]"
        auprc = f"{100 * row['auprc']:.1f} [{100 * row['auprc_ci_low']:.1f}, {100 * row['auprc_ci_high']:.1f}]"
        print(f"| {name} | {row['read']} | {row['untagged']} | {auroc} | {auprc} |")
    if args.json is not None:
        from eagrl.io import write_json_atomic

        write_json_atomic(args.json, found)


if __name__ == "__main__":
    main()
