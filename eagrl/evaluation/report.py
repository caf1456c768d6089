"""The results of a ``make reproduce`` run: tables (``results.md``, ``results.json``) and plots, read from
the run directories' own files, never typed in.

    python -m eagrl.evaluation.report --runs runs --out results

Where each number comes from (``<runs>/<dataset>/<method><suffix>/``):

- the main table: ``metrics.json`` ``test/auroc``, ``test/auroc_std``, ``test/auprc``, ``test/auprc_std`` (mean
  and std over the bootstrap resamples, shown x100) and ``test/samples`` (patients answered; ConCare: the
  whole test split) of every method x dataset run;
- the main table's "ConCare, observation window" row: ConCare trained and tested on the first days of the stay
  (``concare_window``: TJH's first 2 days, MIMIC-IV's first 48 h; ``configs/windows/``), beside the whole-stay
  row, so a reader sees how much the whole-stay protocol (whose length of stay tells the outcome) inflates it;
- the ablation table: the same for the TJH ablation runs on their fixed subset of test patients, with each row's
  strict parse rate and R_att on those patients and its paired ΔAUROC against the full EAG-RL; the robustness table: the TJH runs re-tested with
  a shuffled feature order in the text (``robust/<method>_<percent>``, on the ablations' subset; 0% is the main run,
  scored again on that subset once the subset's runs exist; ConCare reads one
  GRU per feature and is order-invariant by construction, so it has no numbers there); the cross-dataset table:
  the MIMIC-IV-trained models tested on TJH (``cross/<method>``, with their strict parse rate and R_att, beside the
  same method trained on TJH on the same subset; ConCare is not applicable: its inputs are dataset-specific feature
  columns);
- calibration (Brier score, expected calibration error over 10 bins, ``calibration.png``'s reliability diagrams):
  the same per-patient predictions, on every patient answered (an unparsed LLM answer counts as ŷ = 0.5, as in the
  metrics);
- subgroups (AUROC and AUPRC by sex and by age band, with their sizes): ``metrics.json``'s ``test/subgroup_*`` keys
  (``eagrl.evaluation.metrics.subgroup_metrics``; a subgroup with fewer than 10 positives or negatives has no
  number and is shown as too small);
- ROC and PR curves: the per-patient predictions of each run (``generations.jsonl`` of the LLM methods,
  the test rows of ConCare's ``expert_attention.jsonl``); RL curves: the runs' ``logs/*/metrics.csv``.

A run that is missing shows "—" (not run); a metric that is undefined (one outcome among the patients
answered) shows "n/a". A run that has started and not ended (``is_unfinished``: its ``run_info.json`` without a newer
``metrics.json``, or a fit not yet tested; a stage still running, or one killed) is read as missing, and the report's
header names it, so a report built while ``make reproduce`` runs never shows half a search or half a training curve
as a result.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import json
import math
import os
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from eagrl.errors import EAGRLInputError
from eagrl.evaluation.readings import answer_reading_of
from eagrl.io import write_json_atomic, write_text_atomic

COLUMNS = [  # (key, title, dataset folder, run-name suffix): the real cohorts of the main table
    ("tjh", "TJH mortality", "tjh", ""),
    ("mimic_iv_mortality", "MIMIC-IV mortality", "mimic_iv", "_mortality"),
    ("mimic_iv_readmission", "MIMIC-IV readmission", "mimic_iv", "_readmission"),
]
SYNTHETIC_COLUMN = ("synthetic", "Synthetic (mechanism check)", "synthetic", "")
ALL_COLUMNS = [SYNTHETIC_COLUMN, *COLUMNS]
MAIN = [  # (row, run name)
    ("ConCare", "concare"),
    ("ConCare, observation window", "concare_window"),
    ("Vanilla", "prompting_vanilla"),
    ("Think-then-Answer", "prompting_think"),
    ("Question Decomposition", "prompting_decomposition"),
    ("SFT", "sft"),
    ("GRPO", "rl_grpo"),
    ("DAPO", "rl_dapo"),
    ("EAG-RL", "rl"),
]
ABLATIONS = [
    ("EAG-RL (full)", "rl"),
    ("without stage 1 (RL from the base model)", "rl_no_stage1"),
    ("without stage 2 (SFT only)", "sft"),
    ("without R_att", "rl_no_att"),
    ("without ε(τ)", "rl_no_entropy"),
]
ROBUST_METHODS = [("Base LLM (Question Decomposition)", "prompting_decomposition"), ("EAG-RL", "rl")]
WINDOW_ROW = "ConCare, observation window"
WINDOW_NOT_APPLICABLE = {"mimic_iv_readmission"}  # predicted at discharge from the whole stay, by its definition
SHUFFLED = [0, 20, 40, 60, 100]
CROSS = [("Base LLM (Question Decomposition)", "prompting_decomposition"), ("SFT", "sft"), ("EAG-RL", "rl")]
CROSS_ON_TJH = {  # per cross row: where the report holds the same method trained on TJH, scored on the same fixed subset
    "Base LLM (Question Decomposition)": ("robustness", "Base LLM (Question Decomposition)", "0"),
    "SFT": ("ablation", "without stage 2 (SFT only)"),
    "EAG-RL": ("ablation", "EAG-RL (full)"),
}
RL_VARIANTS = [("GRPO", "rl_grpo"), ("DAPO", "rl_dapo"), ("EAG-RL", "rl"), ("without R_att", "rl_no_att"), ("without ε(τ)", "rl_no_entropy"),
               ("without stage 1", "rl_no_stage1")]


@dataclass
class Cell:
    """One method x dataset result (fractions in [0, 1]; None: undefined)."""

    source: str
    auroc: Optional[float] = None
    auroc_std: Optional[float] = None
    auprc: Optional[float] = None
    auprc_std: Optional[float] = None
    patients: Optional[int] = None
    auroc_ci: Optional[list[float]] = None
    auprc_ci: Optional[list[float]] = None
    strict_parse_rate: Optional[float] = None
    r_att: Optional[float] = None

    def text(self) -> tuple[str, str]:
        """Per metric, ``mean ± std [2.5th, 97.5th percentile]`` x100 over the bootstrap resamples."""

        def one(mean, std, ci):
            if mean is None:
                return "n/a"
            interval = f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
            return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}{interval}"

        return one(self.auroc, self.auroc_std, self.auroc_ci), one(self.auprc, self.auprc_std, self.auprc_ci)


def _delta_text(d: Optional[dict[str, Any]], metric: str = "auroc") -> str:
    """A paired difference (``paired_on_shared``) as ``+Δ [low, high]`` x100; "—": not run; "n/a": undefined."""
    if d is None:
        return "—"
    if f"delta_{metric}" not in d:
        return "n/a"
    return f"{100 * d[f'delta_{metric}']:+.1f} [{100 * d[f'delta_{metric}_ci_low']:+.1f}, {100 * d[f'delta_{metric}_ci_high']:+.1f}]"


def _parse_and_r_att_text(c: Optional[dict[str, Any]]) -> str:
    """A cell's strict parse rate and R_att as two table columns ("—" where absent)."""
    rate, r_att = (None, None) if c is None else (c.get("strict_parse_rate"), c.get("r_att"))
    return f"{'—' if rate is None else f'{100 * rate:.0f}%'} | {'—' if r_att is None else f'{100 * r_att:.1f}'}"


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _metrics_of(run: Path) -> Optional[dict[str, Any]]:
    """The parsed ``metrics.json`` of a run, or None when it has none or has not ended (``is_unfinished``): the one
    reader of a run's metrics, so every table leaves out the same runs."""
    path = run / "metrics.json"
    if not path.is_file() or is_unfinished(run):
        return None
    return json.loads(path.read_text())


def read_cell(run: Path) -> Optional[Cell]:
    """The test metrics of one run directory, or None when it has no ``metrics.json`` or has not ended (``is_unfinished``)."""
    metrics = _metrics_of(run)
    if metrics is None:
        return None
    patients = _number(metrics.get("test/samples"))
    if patients is None and (run / "expert_attention.jsonl").is_file():  # ConCare: the whole test split
        patients = sum(1 for r in _jsonl(run / "expert_attention.jsonl") if r.get("split") == "test")
    def interval(name: str) -> Optional[list[float]]:
        low, high = _number(metrics.get(f"test/{name}_ci_low")), _number(metrics.get(f"test/{name}_ci_high"))
        return None if low is None or high is None else [low, high]

    return Cell(
        source=str(run / "metrics.json"),
        auroc=_number(metrics.get("test/auroc")),
        auroc_std=_number(metrics.get("test/auroc_std")),
        auprc=_number(metrics.get("test/auprc")),
        auprc_std=_number(metrics.get("test/auprc_std")),
        patients=int(patients) if patients is not None else None,
        auroc_ci=interval("auroc"),
        auprc_ci=interval("auprc"),
        strict_parse_rate=_number(metrics.get("test/strict_parse_rate")),
        r_att=_number(metrics.get("test/r_att")),
    )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _test_rows(run: Path) -> Optional[list[tuple[Optional[str], float, int]]]:
    """(id or None, ŷ, label) of the test patients of a run, or None (also while it runs). Unparsed answers count as 0.5,
    as in the metrics."""
    if is_unfinished(run):
        return None
    if (run / "generations.jsonl").is_file():
        rows = [r for r in _jsonl(run / "generations.jsonl") if r.get("split", "test") == "test"]
        return [(r.get("id"), r["y_hat"] if r["y_hat"] is not None else 0.5, int(r["label"])) for r in rows]
    if (run / "expert_attention.jsonl").is_file():
        rows = [r for r in _jsonl(run / "expert_attention.jsonl") if r.get("split") == "test"]
        return [(r.get("id"), float(r["prob"]), int(r["label"])) for r in rows]
    return None


def predictions(run: Path) -> Optional[tuple[list[float], list[int]]]:
    """(ŷ, labels) of the test patients of a run, or None."""
    rows = _test_rows(run)
    return None if rows is None else ([y for _, y, _ in rows], [label for _, _, label in rows])


def predictions_by_id(run: Path) -> Optional[dict[str, tuple[float, int]]]:
    """{sample id: (ŷ, label)} of the test patients of a run; None when it has none or a row without an id
    (patients are paired by id only). The ids stay in memory, never written."""
    rows = _test_rows(run)
    if rows is None or any(i is None for i, _, _ in rows):
        return None
    return {str(i): (y, label) for i, y, label in rows}


BASE_ROW = "Question Decomposition"
LLM_ROWS = ("Vanilla", "Think-then-Answer", "Question Decomposition", "SFT", "GRPO", "DAPO", "EAG-RL")
PAIRS = [(row, BASE_ROW) for row in LLM_ROWS if row != BASE_ROW] + [("EAG-RL", other) for other in ("SFT", "GRPO", "DAPO")]
PAIRED_RESAMPLES = 1000


def paired_differences(runs: Path, n_bootstrap: int = PAIRED_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per dataset column, per pair (a, b) of ``PAIRS``: ΔAUROC and ΔAUPRC (a − b) on the test patients both
    answered, with 95% percentile intervals over the same resamples (``eagrl.evaluation.metrics.paired_difference``)."""
    names = dict(MAIN)
    out: dict[str, dict[str, Any]] = {}
    for key, _, folder, suffix in COLUMNS:
        found = {row: predictions_by_id(runs / folder / f"{names[row]}{suffix}") for row in LLM_ROWS}
        out[key] = {f"{a} − {b}": paired_on_shared(found[a], found[b], n_bootstrap, seed) for a, b in PAIRS}
    return out


TRAINED_ROWS = ("SFT", "GRPO", "DAPO", "EAG-RL")
TRAINED_PAIRS = list(itertools.combinations(TRAINED_ROWS, 2))
DIFFER_AIM = 0.10  # the trained rows should differ pairwise in at least 10% of their test ŷ (else the table shows one model)


def answer_differences(runs: Path) -> dict[str, dict[str, Optional[dict[str, Any]]]]:
    """Per dataset column (the synthetic one too), per pair of ``TRAINED_ROWS``: on the test patients both answered,
    the share whose ŷ differs (by more than 1e-6; an unparsed answer is 0.5). Rows of identical models show 0%."""
    names = dict(MAIN)
    out: dict[str, dict[str, Optional[dict[str, Any]]]] = {}
    for key, _, folder, suffix in ALL_COLUMNS:
        found = {row: predictions_by_id(runs / folder / f"{names[row]}{suffix}") for row in TRAINED_ROWS}
        out[key] = {f"{a} vs {b}": yhat_difference(found[a], found[b]) for a, b in TRAINED_PAIRS}
    return out


def yhat_difference(found_a: Optional[dict[str, tuple[float, int]]], found_b: Optional[dict[str, tuple[float, int]]]) -> Optional[dict[str, Any]]:
    """{"patients": shared test patients, "differ": the share of them whose ŷ differs between the two runs}."""
    if found_a is None or found_b is None:
        return None
    shared = sorted(set(found_a) & set(found_b))
    if not shared:
        return {"patients": 0, "differ": None}
    differ = sum(abs(found_a[i][0] - found_b[i][0]) > 1e-6 for i in shared)
    return {"patients": len(shared), "differ": differ / len(shared)}


TOP_NAMED = 3  # the most often named features shown per LLM row


def answer_profile(run: Path) -> Optional[dict[str, Any]]:
    """What an LLM run wrote on its test patients, as counts only (no text, no id): how many distinct ŷ it gave, the
    share of its parsed ŷ at or above 0.5, the share of answers that name one of the expert's top-k features, the
    features it named most often and those the expert ranked most often (each with the share of answers), its R_att
    against each patient's own expert top-k and against the top-k of other patients (``shuffled_alignment``: equal for a
    template that names the cohort's common features whoever the patient is), and the median number of generated
    tokens with the share of answers cut off at the token limit. And who answered: the
    share of the patients with and without the outcome whose answer was read (a parsed ŷ), and the AUROC over those
    answered alone (None unless both outcomes answered). Every unread answer is scored 0.5 in the main table, so a
    model that answers more often for one outcome gets an AUROC away from 0.5 from its answering alone; these say
    whether it did."""
    path = run / "generations.jsonl"
    if not path.is_file() or is_unfinished(run):
        return None
    rows = [r for r in _jsonl(path) if r.get("split", "test") == "test"]
    if not rows:
        return None

    def most_common(lists: list[list[str]]) -> list[list[Any]]:
        counts = Counter(name for names in lists for name in set(names))
        return [[name, count / len(rows)] for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_NAMED]]

    parsed = [float(r["y_hat"]) for r in rows if r.get("y_hat") is not None]
    named = [[f if isinstance(f, str) else f[0] for f in r.get("features") or []] for r in rows]
    tokens = sorted(int(r["new_tokens"]) for r in rows if r.get("new_tokens") is not None)
    answered = [r for r in rows if r.get("y_hat") is not None]

    def share_answered(outcome: int) -> Optional[float]:
        group = [r for r in rows if int(r["label"]) == outcome]
        return sum(r.get("y_hat") is not None for r in group) / len(group) if group else None

    alignment = None  # R_att against the patient's own expert top-k and against other patients' (shuffled_alignment)
    if all(r.get("expert_top_k") for r in rows):
        from eagrl.evaluation.metrics import shuffled_alignment

        alignment = shuffled_alignment(named, [r["expert_top_k"] for r in rows], [int(r.get("unknown_features") or 0) for r in rows])
    auroc_answered = None
    if len({int(r["label"]) for r in answered}) == 2:
        import torch

        from eagrl.evaluation.metrics import binary_metrics

        probs = torch.tensor([float(r["y_hat"]) for r in answered])
        auroc_answered = binary_metrics(probs, torch.tensor([int(r["label"]) for r in answered]))["auroc"]
    return {
        "patients": len(rows),
        "distinct_yhat": len({round(y, 6) for y in parsed}),
        "share_yhat_positive": sum(y >= 0.5 for y in parsed) / len(parsed) if parsed else None,
        "share_naming_expert": sum(float(r.get("r_att") or 0.0) > 0 for r in rows) / len(rows),
        "most_named": most_common(named),
        "expert_most_ranked": most_common([list(r.get("expert_top_k") or []) for r in rows]),
        "r_att_shuffled": alignment,
        "median_new_tokens": tokens[len(tokens) // 2] if tokens else None,
        "share_cut_off": sum(r.get("finished") is False for r in rows) / len(rows),
        "answered": len(answered),
        "answered_with_outcome": share_answered(1),
        "answered_without_outcome": share_answered(0),
        "auroc_answered": auroc_answered,
    }


def answer_profiles(runs: Path) -> dict[str, dict[str, Optional[dict[str, Any]]]]:
    """``answer_profile`` per dataset column (the synthetic one too) and LLM row."""
    names = dict(MAIN)
    return {key: {row: answer_profile(runs / folder / f"{names[row]}{suffix}") for row in LLM_ROWS} for key, _, folder, suffix in ALL_COLUMNS}


def paired_on_shared(
    found_a: Optional[dict[str, tuple[float, int]]], found_b: Optional[dict[str, tuple[float, int]]], n_bootstrap: int = PAIRED_RESAMPLES, seed: int = 0
) -> Optional[dict[str, Any]]:
    """a − b (``paired_difference``) on the test patients both runs answered (``predictions_by_id``); None when a run
    has no predictions, only ``patients`` when the shared patients hold one outcome."""
    import torch

    from eagrl.evaluation.metrics import paired_difference

    if found_a is None or found_b is None:
        return None
    shared = sorted(set(found_a) & set(found_b))
    labels = torch.tensor([found_a[i][1] for i in shared])
    if len(shared) < 2 or labels.min() == labels.max():
        return {"patients": len(shared)}
    probs_a = torch.tensor([found_a[i][0] for i in shared], dtype=torch.float)
    probs_b = torch.tensor([found_b[i][0] for i in shared], dtype=torch.float)
    return {"patients": len(shared), **paired_difference(probs_a, probs_b, labels, n_bootstrap, seed)}


def collect(runs: Path) -> dict[str, Any]:
    """Every table's cells, as ``results.json`` holds them."""

    def cell(path: Path) -> Optional[dict[str, Any]]:
        found = read_cell(path)
        return None if found is None else found.__dict__

    main = {row: {key: cell(runs / folder / f"{name}{suffix}") for key, _, folder, suffix in COLUMNS} for row, name in MAIN}
    ablation = {row: cell(runs / "tjh" / name) for row, name in ABLATIONS}
    subset = _ablation_subset(runs)
    if subset:  # the main-table runs answered every test patient: scored again on the ablations' subset
        for row, name in ABLATIONS:
            found = _cell_on(runs / "tjh" / name, subset)
            if found is not None and (ablation[row] or {}).get("patients") != len(subset):
                ablation[row] = found
    robustness = {
        row: {str(p): cell(runs / "tjh" / (name if p == 0 else f"robust/{name}_{p}")) for p in SHUFFLED} for row, name in ROBUST_METHODS
    }
    if subset:  # the shuffled runs answer the subset: 0% is the main run scored again on the same patients
        for row, name in ROBUST_METHODS:
            found = _cell_on(runs / "tjh" / name, subset)
            if found is not None:
                robustness[row]["0"] = found
    cross = {row: cell(runs / "cross" / name) for row, name in CROSS}
    return {
        "main": main, "ablation": ablation, "ablation_paired": ablation_paired(runs, subset), "robustness": robustness, "cross_dataset": cross, "paired": paired_differences(runs),
        "answer_differences": answer_differences(runs), "answers": answer_profiles(runs),
        "calibration": calibration_table(runs), "subgroups": subgroup_table(runs), "synthetic": synthetic_check(runs), "reward_trends": reward_trends(runs), "seeds": seed_runs(runs), "stage1": {key: stage1_summary(runs / folder / f"distill{suffix}") for key, _, folder, suffix in ALL_COLUMNS},
    }  # fmt: skip


def subgroup_table(runs: Path) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{dataset key: {main-table row: {subgroup key: {"patients", "positives", "auroc", "auprc"}}}} from each run's
    ``metrics.json`` (auroc/auprc None: too small for a number)."""
    from eagrl.evaluation.metrics import SUBGROUPS

    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for key, _, folder, suffix in COLUMNS:
        for row, name in MAIN:
            metrics = _metrics_of(runs / folder / f"{name}{suffix}") or {}
            if f"test/subgroup_{SUBGROUPS[0][0]}_patients" not in metrics:
                continue
            table.setdefault(key, {})[row] = {
                group: {
                    "patients": int(metrics[f"test/subgroup_{group}_patients"]),
                    "positives": int(metrics[f"test/subgroup_{group}_positives"]),
                    "auroc": _number(metrics.get(f"test/subgroup_{group}_auroc")),
                    "auprc": _number(metrics.get(f"test/subgroup_{group}_auprc")),
                }
                for group, _ in SUBGROUPS
            }
    return table


def calibration_table(runs: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset key: {main-table row: ``metrics.calibration`` of its test predictions, with ``patients``}} for every
    run found (the synthetic cohort included)."""
    import torch

    from eagrl.evaluation.metrics import calibration

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for key, _, folder, suffix in ALL_COLUMNS:
        for row, name in MAIN:
            found = predictions(runs / folder / f"{name}{suffix}")
            if found is None or not found[0]:
                continue
            result = calibration(torch.tensor(found[0], dtype=torch.double), torch.tensor(found[1]))
            table.setdefault(key, {})[row] = {**result, "patients": len(found[0])}
    return table


def seed_runs(runs: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset, per RL variant run again with another seed (``<name>_seed<N>``, ``SEEDS="0 1"``): its test cell
    beside the main run's ("main": the config's seed), so a reader sees how much of a gap is seed noise. Each extra
    seed's cell also holds ``vs_main``: its paired difference from the main run on the patients both answered
    (``paired_on_shared``, seed − main) and ``yhat_differ``: the share of those patients whose ŷ differs."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, _, folder, suffix in ALL_COLUMNS:
        for row, name in RL_VARIANTS:
            extra = sorted((runs / folder).glob(f"{name}{suffix}_seed*")) if (runs / folder).is_dir() else []
            main_run = runs / folder / f"{name}{suffix}"
            main = read_cell(main_run)
            found_main = predictions_by_id(main_run) if extra else None
            cells: dict[str, dict[str, Any]] = {}
            for run in extra:
                cell = read_cell(run)
                if cell is None:
                    continue
                found = predictions_by_id(run)
                differ = yhat_difference(found, found_main)
                cells[run.name.rsplit("_seed", 1)[1]] = {**cell.__dict__, "vs_main": paired_on_shared(found, found_main),
                                                         "yhat_differ": None if differ is None else differ["differ"]}  # fmt: skip
            if cells and main is not None:
                out.setdefault(key, {})[row] = {"main": main.__dict__, **cells}
    return out


def _ablation_subset(runs: Path) -> Optional[list[str]]:
    """The test patients of the pipeline's fixed TJH subset: those the ablation runs answered, else (none of them
    under ``runs``) those the shuffled robustness runs answered, which are the same (``eagrl.pipeline``); None when
    no such run answered any."""
    names = [name for _, name in ABLATIONS if name not in ("rl", "sft")]
    names += [f"robust/{name}_{p}" for _, name in ROBUST_METHODS for p in SHUFFLED if p]
    for name in names:
        found = predictions_by_id(runs / "tjh" / name)
        if found:
            return sorted(found)
    return None


def _cell_on(run: Path, ids: list[str], n_bootstrap: int = 100) -> Optional[dict[str, Any]]:
    """A run's test metrics recomputed on the patients ``ids`` (mean, std and percentile interval over
    ``n_bootstrap`` resamples, as in ``metrics.json``), or None when the run answered none of them."""
    import torch

    from eagrl.evaluation.metrics import bootstrap_metrics

    found = predictions_by_id(run)
    if not found or not all(i in found for i in ids):
        return None
    probs = torch.tensor([found[i][0] for i in ids], dtype=torch.float)
    labels = torch.tensor([found[i][1] for i in ids])
    m = bootstrap_metrics(probs, labels, n_bootstrap)
    pick = lambda k: None if not math.isfinite(m.get(k, float("nan"))) else m[k]  # noqa: E731
    cell = Cell(source=f"{run / 'generations.jsonl'} (on the ablation subset)", auroc=pick("auroc"), auroc_std=pick("auroc_std"),
                auprc=pick("auprc"), auprc_std=pick("auprc_std"), patients=len(ids))  # fmt: skip
    if pick("auroc_ci_low") is not None:
        cell.auroc_ci, cell.auprc_ci = [m["auroc_ci_low"], m["auroc_ci_high"]], [m["auprc_ci_low"], m["auprc_ci_high"]]
    wanted = set(ids)  # the strict parse rate and R_att over the same patients, as metrics.json gives them for the whole split
    rows = [r for r in _jsonl(run / "generations.jsonl") if r.get("split", "test") == "test" and str(r.get("id")) in wanted]
    if rows and all("parsed_strict" in r for r in rows):
        cell.strict_parse_rate = sum(bool(r["parsed_strict"]) for r in rows) / len(rows)
    if rows and all(r.get("r_att") is not None for r in rows):
        cell.r_att = sum(float(r["r_att"]) for r in rows) / len(rows)
    return cell.__dict__


FULL_ABLATION_ROW = ABLATIONS[0][0]


def ablation_paired(runs: Path, subset: Optional[list[str]], n_bootstrap: int = PAIRED_RESAMPLES, seed: int = 0) -> dict[str, Optional[dict[str, Any]]]:
    """Per ablation row: its ΔAUROC and ΔAUPRC against the full EAG-RL (row − full) on the ablations' subset
    (``_ablation_subset``), with 95% percentile intervals over the same paired resamples (``paired_on_shared``); None
    where a run is missing."""
    if not subset:
        return {}
    wanted = set(subset)

    def on_subset(name: str) -> Optional[dict[str, tuple[float, int]]]:
        found = predictions_by_id(runs / "tjh" / name)
        if found is None or not wanted <= set(found):
            return None
        return {i: v for i, v in found.items() if i in wanted}

    full = on_subset(dict(ABLATIONS)[FULL_ABLATION_ROW])
    return {f"{row} − {FULL_ABLATION_ROW}": paired_on_shared(on_subset(name), full, n_bootstrap, seed) for row, name in ABLATIONS[1:]}


def is_unfinished(run: Path) -> bool:
    """Whether the stage in ``run`` was started and has not ended: its ``run_info.json`` (written when a stage starts)
    is there but its ``metrics.json`` (written when a search, a test or a fit ends) is not, or is older; or it is a fit
    that tests after fitting (``test_after_fit``, in its ``config.yaml``) and its ``metrics.json`` holds no test metric
    yet. Such a run's files (``trajectories.jsonl``, ``logs/*/metrics.csv``, a metrics.json of its training alone) are
    not read: they would be reported as if the stage had ended."""
    info, metrics = run / "run_info.json", run / "metrics.json"
    if not info.is_file():
        return False
    if not metrics.is_file() or metrics.stat().st_mtime < info.stat().st_mtime:
        return True
    try:
        fit = json.loads(info.read_text()).get("command") == ["fit"]
        tested = any(key.startswith("test/") for key in json.loads(metrics.read_text()))
    except (json.JSONDecodeError, AttributeError):
        return False  # an unreadable file is reported where its numbers are read
    if not fit or tested or not (run / "config.yaml").is_file():
        return False
    try:
        init = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {}).get("init_args") or {}
    except (yaml.YAMLError, AttributeError):
        return False
    return bool(init.get("test_after_fit", False))


def unfinished_runs(runs: Path) -> list[str]:
    """The run directories under ``runs`` (as paths relative to it) whose stage has not ended (``is_unfinished``)."""
    return sorted(p.parent.relative_to(runs).as_posix() for p in _files_named(runs, "run_info.json") if is_unfinished(p.parent))


def stage1_summary(run: Path) -> Optional[dict[str, Any]]:
    """Aggregates of a distillation run (``trajectories.jsonl`` and its ``.done`` list): patients searched, patients
    with a kept trajectory, kept trajectories, the share of those with R_att > 0 and their mean R_att. Counts only.
    None for a search still running (``is_unfinished``)."""
    path = run / "trajectories.jsonl"
    if not path.is_file() or is_unfinished(run):
        return None
    rows = _jsonl(path)
    done = run / "trajectories.jsonl.done"
    searched = sum(1 for line in done.read_text().splitlines() if line.strip()) if done.is_file() else None
    aligned = [r for r in rows if float(r.get("r_att") or 0.0) > 0]
    return {
        "patients_searched": searched,
        "patients_kept": len({r["id"] for r in rows}),
        "trajectories_kept": len(rows),
        "share_r_att_positive": len(aligned) / len(rows) if rows else None,
        "mean_r_att": sum(float(r.get("r_att") or 0.0) for r in rows) / len(rows) if rows else None,
        "share_correct": sum((r["y_hat"] >= 0.5) == (int(r["label"]) == 1) for r in rows if r.get("y_hat") is not None) / len(rows) if rows else None,
    }


SYNTHETIC_ROWS = [("ConCare", "concare"), ("Question Decomposition", "prompting_decomposition"), ("SFT", "sft"), ("GRPO", "rl_grpo"), ("EAG-RL", "rl")]
SYNTHETIC_PAIRS = [("EAG-RL", "GRPO"), ("EAG-RL", "Question Decomposition"), ("SFT", "Question Decomposition")]


def synthetic_check(runs: Path) -> Optional[dict[str, Any]]:
    """The mechanism check on the synthetic cohort: per main method its test metrics, strict parse rate and R_att; the
    expert's attention on the outcome rule's variables; paired differences (EAG-RL against GRPO and the base model)."""
    from eagrl.data.synthetic import RULE_FEATURES

    root = runs / "synthetic"
    if not root.is_dir():
        return None
    rows = {row: (lambda c: None if c is None else c.__dict__)(read_cell(root / name)) for row, name in SYNTHETIC_ROWS}
    expert = None
    if (root / "concare" / "expert_attention.jsonl").is_file():
        records = _jsonl(root / "concare" / "expert_attention.jsonl")
        positives = [r for r in records if int(r["label"]) == 1]
        weight = lambda r: sum(w for f, w in r["features"] if f in RULE_FEATURES)  # noqa: E731
        expert = {
            "rule_features": list(RULE_FEATURES),
            "attention_on_rule_positives": sum(weight(r) for r in positives) / max(len(positives), 1),
            "attention_on_rule_negatives": sum(weight(r) for r in records if int(r["label"]) == 0) / max(len(records) - len(positives), 1),
            "top_k_slots_on_rule": sum(f in RULE_FEATURES for r in records for f in r["top_k"]) / max(sum(len(r["top_k"]) for r in records), 1),
        }
    names = dict(SYNTHETIC_ROWS)
    paired = {f"{a} − {b}": paired_on_shared(predictions_by_id(root / names[a]), predictions_by_id(root / names[b])) for a, b in SYNTHETIC_PAIRS}
    return {"rows": rows, "expert": expert, "paired": paired}


def _files_named(runs: Path, name: str) -> list[Path]:
    """Every file called ``name`` under ``runs``, sorted, following symlinked folders (``Path.glob("**")`` before
    Python 3.13 does not, so a report built over linked run folders lost their facts)."""
    return sorted(Path(folder) / name for folder, _, files in os.walk(runs, followlinks=True) if name in files)


def _run_facts(runs: Path) -> dict[str, Any]:
    """Model, data, sizes and date of the run, from the run bundles (``run_info.json``, ``config.yaml``)."""
    facts: dict[str, Any] = {"generated": dt.datetime.now().isoformat(timespec="seconds")}
    infos = sorted(_files_named(runs, "run_info.json"), key=lambda p: p.stat().st_mtime)
    if infos:
        info = json.loads(infos[-1].read_text())
        facts["git_revision"] = info.get("git_revision")
        facts["versions"] = info.get("versions", {})
        facts["runs_between"] = [dt.datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="minutes") for p in (infos[0], infos[-1])]
    facts["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {torch_device()}" if torch_device() else "")
    models = set()
    for config in _files_named(runs, "config.yaml"):
        backbone = ((yaml.safe_load(config.read_text()) or {}).get("model", {}).get("init_args", {}) or {}).get("backbone")
        if isinstance(backbone, dict) and backbone.get("name"):
            models.add(str(backbone["name"]))
    facts["llm_backbones"] = sorted(models)
    facts["answer_reading"] = answer_readings(runs)
    facts["generation_dtype"] = generation_dtypes(runs)
    facts["unfinished"] = unfinished_runs(runs)
    return facts


def generation_dtypes(runs: Path) -> dict[str, str]:
    """{run path under ``runs``: the dtype its LLM generated in} (``metrics.json``'s ``generation.dtype``). Under
    ``generation_dtype: auto`` each process picks the faster dtype by a start-up timing, so two runs on a busy machine
    can generate in different dtypes, and greedy answers can differ by the dtype alone: the report names such a mix."""
    found: dict[str, str] = {}
    for metrics in _files_named(runs, "metrics.json"):
        try:
            generation = json.loads(metrics.read_text()).get("generation")
        except (json.JSONDecodeError, AttributeError):
            continue  # an unreadable metrics.json is reported where its numbers are read
        if isinstance(generation, dict) and generation.get("dtype"):
            found[metrics.parent.relative_to(runs).as_posix()] = str(generation["dtype"])
    return found


def dtype_mix_text(dtypes: dict[str, str]) -> Optional[str]:
    """The report's line on the runs' generation dtypes: one dtype for all, or the runs of each when they differ."""
    if not dtypes:
        return None
    by_dtype: dict[str, list[str]] = {}
    for run, dtype in sorted(dtypes.items()):
        by_dtype.setdefault(dtype, []).append(run)
    if len(by_dtype) == 1:
        return f"- LLM generation in {next(iter(by_dtype))} for every run (`metrics.json` `generation.dtype`)"
    runs_of = "; ".join(f"{dtype}: {', '.join(runs)}" for dtype, runs in sorted(by_dtype.items()))
    return ("- **the LLM runs generated in different dtypes** (greedy answers can differ by the dtype alone; pin "
            f"`--model.init_args.backbone.generation_dtype` to compare them): {runs_of}")


def answer_readings(runs: Path) -> dict[str, str]:
    """{run path under ``runs``: how its evaluation read ŷ} for every LLM run with answers (``generations.jsonl``):
    ``final_answer`` (only the ``<Final Answer>`` span) or ``anywhere`` (the older reading, also the last number
    of a completion without the tag: a run configured before ``answer_reading`` existed read that way)."""
    found: dict[str, str] = {}
    for answers in _files_named(runs, "generations.jsonl"):
        found[answers.parent.relative_to(runs).as_posix()] = answer_reading_of(answers.parent)
    return found


LLM_FREE_ROWS = {"ConCare", WINDOW_ROW}  # the rows whose numbers do not depend on how an LLM answer is read


def read_the_older_way(facts: dict[str, Any]) -> list[str]:
    """The runs of a report whose LLM answers were read the older way: all of them (``["*"]``) for a report written
    before the ``answer_reading`` fact existed, else those it names with ``anywhere``."""
    if "answer_reading" not in facts:
        return ["*"]
    return sorted(run for run, reading in (facts["answer_reading"] or {}).items() if reading == "anywhere")


def without_llm_entries(previous: dict[str, Any]) -> dict[str, Any]:
    """An earlier ``results.json`` reduced to ConCare's main-table, calibration and subgroup entries: what may be
    carried from a report with LLM answers read the older way (``read_the_older_way``). Everything else goes: the
    synthetic section (its ConCare row too), the RL reward trends (carried only with their runs' cells) and the
    stage-1 summaries (its paths' answers were read before a list number stopped counting as ŷ)."""
    kept: dict[str, Any] = {"main": {row: cells for row, cells in (previous.get("main") or {}).items() if row in LLM_FREE_ROWS}}
    for section in ("calibration", "subgroups"):
        kept[section] = {key: {row: v for row, v in (rows or {}).items() if row in LLM_FREE_ROWS} for key, rows in (previous.get(section) or {}).items()}
    return kept


def torch_device() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def markdown(results: dict[str, Any], facts: dict[str, Any]) -> str:
    def fmt(c: Optional[dict[str, Any]]) -> tuple[str, str, str]:
        if c is None:
            return "—", "—", "—"
        auroc, auprc = Cell(**{k: v for k, v in c.items() if k in Cell.__dataclass_fields__}).text()
        return auroc, auprc, str(c["patients"]) if c["patients"] is not None else "?"

    lines = ["# Results", "", f"Generated {facts['generated']} from the run directories (every number is read from a run's `metrics.json`).", ""]
    versions = facts.get("versions", {})
    lines += [
        f"- LLM backbone(s) of these runs: {', '.join(facts.get('llm_backbones') or ['?'])}",
        f"- runs written between {' and '.join(facts.get('runs_between') or ['?'])} on {facts['machine']}",
        f"- git revision of the latest run {facts.get('git_revision', '?')}; torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}",
        "- data: TJH (published split) and the MIMIC-IV Clinical Database Demo v2.2 (stratified split); sizes: see n",
    ]
    carried = facts.get("carried_over")
    if carried:
        by_origin: dict[tuple[str, str], list[str]] = {}
        for entry in carried["entries"]:
            by_origin.setdefault((str(entry.get("generated", "?")), str(entry.get("git_revision", "?"))), []).append(entry["path"])
        lines.append(f"- {len(carried['entries'])} entries are not from these runs (whose directories are not here) but taken whole "
                     f"from the earlier report `{carried['from']}`; the ROC/PR and RL-curve plots draw these runs only:")  # fmt: skip
        for (generated, revision), paths in sorted(by_origin.items()):
            lines.append(f"  - from the report generated {generated} (its latest run at git {revision[:7]}): {', '.join(paths)}")
    readings = facts.get("answer_reading") or {}
    older = sorted(run for run, reading in readings.items() if reading == "anywhere")
    if readings:
        lines.append("- LLM answers: ŷ read from the `<Final Answer>` span the prompt asks for (no tag: unparsed, scored 0.5)"
                     + (f"; **read the older way (the last number anywhere, which takes echoed patient data for ŷ)**: {', '.join(older)}" if older else ""))
    if dtypes := dtype_mix_text(facts.get("generation_dtype") or {}):
        lines.append(dtypes)
    if facts.get("not_carried"):
        lines.append(f"- not carried: {facts['not_carried']}")
    if facts.get("unfinished"):
        lines.append(f"- **left out, still running or stopped before its end** (`run_info.json` without a newer `metrics.json`, or a fit not yet tested): {', '.join(facts['unfinished'])}")
    lines.append("")
    lines += ["AUROC and AUPRC x100: mean ± std over the bootstrap resamples of the test patients answered (the paper's form), "
              "then [2.5th, 97.5th percentile] of the same resamples, a 95% interval (n: how many patients; ConCare: the whole "
              "test split). — : not run; n/a: undefined (one outcome among the patients).", ""]  # fmt: skip

    lines += _synthetic_markdown(results.get("synthetic"), fmt)
    lines += ["## Main table", ""]
    header = "| method | " + " | ".join(f"{title} AUROC | {title} AUPRC | n" for _, title, _, _ in COLUMNS) + " |"
    lines += [header, "|---" * (1 + 3 * len(COLUMNS)) + "|"]
    for row, _ in MAIN:
        cells = [
            "not applicable | not applicable | (whole stay by definition)" if row == WINDOW_ROW and key in WINDOW_NOT_APPLICABLE
            else " | ".join(fmt(results["main"][row][key]))
            for key, *_ in COLUMNS
        ]  # fmt: skip
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "ConCare, observation window: trained and tested on TJH's first 2 days and MIMIC-IV's first 48 hours "
              "(stays that end earlier excluded); every other row reads the whole stay (the group's protocol).", ""]  # fmt: skip

    lines += ["## Paired differences", "",
              f"Method a − method b on the test patients both answered, x100, with a 95% percentile interval over {PAIRED_RESAMPLES} "
              "paired bootstrap resamples (the same resampled patients for both methods). An interval that excludes 0 "
              "is a difference this test set can tell apart.", ""]  # fmt: skip
    lines += ["| a − b | " + " | ".join(f"{title} ΔAUROC | {title} ΔAUPRC | n" for _, title, _, _ in COLUMNS) + " |",
              "|---" * (1 + 3 * len(COLUMNS)) + "|"]  # fmt: skip
    for a, b in PAIRS:
        cells = []
        for key, *_ in COLUMNS:
            d = results.get("paired", {}).get(key, {}).get(f"{a} − {b}")
            if d is None:
                cells.append("— | — | —")
            elif "delta_auroc" not in d:
                cells.append(f"n/a | n/a | {d['patients']}")
            else:
                cells.append(f"{_delta_text(d, 'auroc')} | {_delta_text(d, 'auprc')} | {d['patients']}")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")

    lines += ["", "## Do the trained models answer differently?", "",
              f"Per pair of trained rows: the share of the test patients both answered whose ŷ differs (an unparsed answer "
              f"counts as 0.5). Below {100 * DIFFER_AIM:.0f}% (marked ✗) the two rows are nearly one model and their AUROCs "
              "cannot tell the methods apart.", ""]  # fmt: skip
    diffs = results.get("answer_differences", {})
    lines += ["| pair | " + " | ".join(f"{title} | n" for _, title, _, _ in ALL_COLUMNS) + " |", "|---" * (1 + 2 * len(ALL_COLUMNS)) + "|"]
    for a, b in TRAINED_PAIRS:
        cells = []
        for key, *_ in ALL_COLUMNS:
            d = diffs.get(key, {}).get(f"{a} vs {b}")
            if d is None or d["differ"] is None:
                cells.append(f"— | {0 if d is None else d['patients']}")
            else:
                cells.append(f"{100 * d['differ']:.0f}%{'' if d['differ'] >= DIFFER_AIM else ' ✗'} | {d['patients']}")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")

    lines += ["", "## LLM answers on the test patients", "",
              "Strict parse rate: answers whose `<Final Answer>` holds a probability (the reading the RL reward uses); "
              "R_att: the Jaccard overlap of the named features with the expert's top-k (x100).", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(f"{title} strict parse | {title} R_att" for _, title, _, _ in COLUMNS) + " |",
              "|---" * (1 + 2 * len(COLUMNS)) + "|"]  # fmt: skip
    for row in LLM_ROWS:
        cells = []
        for key, *_ in COLUMNS:
            cells.append(_parse_and_r_att_text(results["main"][row][key]))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += _answers_markdown(results.get("answers", {}))

    lines += ["## Stage 1: the distilled trajectories", "",
              "Per dataset: patients searched (train and val), patients with a kept trajectory, kept trajectories, the share of "
              "those with R_att > 0 (they name at least one of the expert's features), their mean R_att, and the share on the "
              "right side of 0.5.", "",
              "| dataset | searched | patients kept | trajectories | R_att > 0 | mean R_att | right side |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    pct = lambda v: "—" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for key, title, *_ in ALL_COLUMNS:
        st = results.get("stage1", {}).get(key)
        if st is None:
            lines.append(f"| {title} | — | — | — | — | — | — |")
            continue
        mean = "—" if st["mean_r_att"] is None else f"{st['mean_r_att']:.2f}"
        lines.append(f"| {title} | {st['patients_searched'] if st['patients_searched'] is not None else '?'} | {st['patients_kept']} | "
                     f"{st['trajectories_kept']} | {pct(st['share_r_att_positive'])} | {mean} | {pct(st['share_correct'])} |")  # fmt: skip
    lines += ["", "## Ablations (TJH mortality)", "",
              "Every row on the same test patients: the ablation runs' fixed balanced subset (the full EAG-RL and SFT rows are "
              "their main-table runs scored again on it). Δ: the row − the full EAG-RL, ΔAUROC x100 with its 95% interval "
              f"over {PAIRED_RESAMPLES:,} paired resamples of these patients (the paper's order is full > each ablation).", "",
              "| variant | AUROC | AUPRC | n | strict parse | R_att | Δ AUROC vs full |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row, _ in ABLATIONS:
        c = results["ablation"][row]
        delta = "" if row == FULL_ABLATION_ROW else _delta_text((results.get("ablation_paired") or {}).get(f"{row} − {FULL_ABLATION_ROW}"))
        lines.append(f"| {row} | " + " | ".join(fmt(c)) + f" | {_parse_and_r_att_text(c)} | {delta} |")

    lines += ["", "## Robustness: shuffled feature order at test time (TJH mortality)", "",
              "The shuffled runs answer the ablations' subset; 0% is the main run, scored again on the same patients once that "
              "subset exists (n says how many).", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(f"{p}% AUROC | {p}% AUPRC" for p in SHUFFLED) + " |", "|---" * (1 + 2 * len(SHUFFLED)) + "|"]
    for row, _ in ROBUST_METHODS:
        lines.append(f"| {row} | " + " | ".join(" | ".join(fmt(results["robustness"][row][str(p)])[:2]) for p in SHUFFLED) + " |")
    lines.append("| ConCare | " + " | ".join(["order-invariant by construction"] + [""] * (2 * len(SHUFFLED) - 1)) + " |")

    lines += ["", "## Generalisation: trained on MIMIC-IV mortality, tested on TJH mortality", "",
              "The MIMIC-IV-trained models answer the ablations' fixed subset of TJH test patients. Beside them, the same method "
              "trained on TJH, scored on those patients (the robustness table's 0% and the ablation table's rows; — where its "
              "run is missing or scored other patients).", "",
              "| method | AUROC | AUPRC | n | strict parse | R_att | trained on TJH: AUROC |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row, _ in CROSS:
        c = results["cross_dataset"][row]
        lines.append(f"| {row} | " + " | ".join(fmt(c)) + f" | {_parse_and_r_att_text(c)} | {_on_tjh_text(results, row, c)} |")
    lines.append("| ConCare | not applicable | not applicable | (its inputs are MIMIC-IV feature columns; TJH has other features) | | | |")
    lines += ["", "## RL training: did the reward move beyond its noise?", "",
              "Per RL run: the mean training reward of the first 5 and the last 5 rollouts, the difference, its standard error "
              "and z = difference / SE (|z| >= 2: a trend beyond the rollouts' noise). Curves: `rl_curves_<dataset>.png`. "
              "Groups with one reward: the share of the rollouts' groups whose G completions all scored the same, in the first "
              "5 and the last 5 rollouts (`train/groups_varied`). Such a group has zero advantage, so the reward teaches it nothing; "
              "a last share near 100% is a policy whose completions all score alike (one answer for every completion, or none "
              "parsed), which the reward alone no longer moves.", "",
              "| dataset | variant | rollouts | first 5 | last 5 | difference ± SE | z | groups with one reward, first 5 → last 5 |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    titles = {key: title for key, title, *_ in ALL_COLUMNS}
    for key, variants in results.get("reward_trends", {}).items():
        for row, t in variants.items():
            if t is None:
                lines.append(f"| {titles[key]} | {row} | < 10 | — | — | — | — | — |")
            else:
                flat = t.get("flat")
                flat = f"{100 * flat['first']:.0f}% → {100 * flat['last']:.0f}%" if flat else "not logged"
                lines.append(f"| {titles[key]} | {row} | {t['rollouts']} | {t['first']:.3f} | {t['last']:.3f} | "
                             f"{t['difference']:+.3f} ± {t['se']:.3f} | {t['z']:+.1f} | {flat} |")  # fmt: skip
    lines += ["", "## Calibration", "",
              "Brier score (mean squared error of ŷ) and expected calibration error (ECE: the patient-weighted mean gap between "
              "ŷ and the observed share of deaths over 10 equal-width bins of ŷ), lower is better, on every test patient "
              "answered (an unparsed answer counts as ŷ = 0.5). A model that always writes the same ŷ can have a small ECE "
              "and no discrimination: read it beside AUROC. Reliability diagrams: `calibration.png`.", "",
              "| dataset | method | Brier | ECE | n |", "|---|---|---|---|---|"]  # fmt: skip
    for key, rows in results.get("calibration", {}).items():
        for row, c in rows.items():
            lines.append(f"| {titles[key]} | {row} | {c['brier']:.3f} | {c['ece']:.3f} | {c['patients']} |")
    from eagrl.evaluation.metrics import MIN_SUBGROUP_CLASS, SUBGROUPS

    lines += ["", "## Subgroups", "",
              f"AUROC x100 by sex and by age band on the test patients answered (n: patients, n+: with the outcome). A subgroup "
              f"with fewer than {MIN_SUBGROUP_CLASS} patients with or without the outcome is too small for a number.", "",
              "| dataset | method | " + " | ".join(title for _, title in SUBGROUPS) + " |", "|---" * (2 + len(SUBGROUPS)) + "|"]  # fmt: skip
    for key, rows in results.get("subgroups", {}).items():
        for row, groups in rows.items():
            cells = []
            for group, _ in SUBGROUPS:
                g = groups[group]
                size = f"(n {g['patients']}, n+ {g['positives']})"
                cells.append(f"too small {size}" if g["auroc"] is None else f"{100 * g['auroc']:.1f} {size}")
            lines.append(f"| {titles[key]} | {row} | " + " | ".join(cells) + " |")
    if results.get("seeds"):
        lines += ["", "## Seed noise: the RL variants with a second seed", "",
                  "Δ: the seed's run − the main run (ΔAUROC x100, 95% interval over "
                  f"{PAIRED_RESAMPLES:,} paired resamples of the patients both answered); ŷ differ: the share of them whose ŷ differs.", "",
                  "| dataset | variant | seed | AUROC | AUPRC | n | strict parse | R_att | Δ AUROC vs main | ŷ differ |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, variants in results["seeds"].items():
            for row, by_seed in variants.items():
                for seed, c in sorted(by_seed.items()):
                    differ = c.get("yhat_differ")
                    delta, share = ("", "") if seed == "main" else (_delta_text(c.get("vs_main")), "—" if differ is None else f"{100 * differ:.0f}%")
                    lines.append(f"| {titles[key]} | {row} | {seed} | " + " | ".join(fmt(c)) + f" | {_parse_and_r_att_text(c)} | {delta} | {share} |")
    lines += ["", "## Plots", ""]
    lines += [f"- `{name}`" for name in results.get("plots", [])]
    return "\n".join(lines) + "\n"


def _on_tjh_text(results: dict[str, Any], row: str, cross: Optional[dict[str, Any]]) -> str:
    """The TJH-trained counterpart of a cross-dataset row (``CROSS_ON_TJH``): its AUROC [95% CI] x100 when it scored as
    many patients as the cross row (both answer the pipeline's fixed subset), else "—"."""
    section, *keys = CROSS_ON_TJH[row]
    found: Any = results.get(section) or {}
    for key in keys:
        found = (found or {}).get(key)
    if not found or not cross or found.get("patients") != cross.get("patients") or found.get("auroc") is None:
        return "—"
    interval = found.get("auroc_ci")
    return f"{100 * found['auroc']:.1f}" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def _shuffled_text(a: Optional[dict[str, Any]]) -> str:
    """``shuffled_alignment`` as one cell: own / shuffled R_att x100 and the permutation p-value ("—" where absent)."""
    return "—" if not a else f"{100 * a['own']:.1f} / {100 * a['shuffled']:.1f} (p {a['p']:.3f})"


def _answers_markdown(answers: dict[str, dict[str, Optional[dict[str, Any]]]]) -> list[str]:
    """The "what the LLM rows write" tables, one per dataset with at least one LLM run (counts only)."""
    share = lambda v: "—" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    named = lambda pairs: ", ".join(f"{n} ({100 * v:.0f}%)" for n, v in pairs) or "none"  # noqa: E731
    lines: list[str] = []
    for key, title, _, _ in ALL_COLUMNS:
        found = {row: p for row, p in answers.get(key, {}).items() if p is not None}
        if not found:
            continue
        if not lines:
            lines += ["## What the LLM rows write", "",
                      "Counts over the test patients' answers, no text: distinct ŷ values, the share of parsed ŷ ≥ 0.5, the share "
                      "of answers naming at least one of the expert's top-k features, the features named most often (share of "
                      "answers), R_att (x100) against the patient's own expert top-k and against other patients' (the "
                      "expert sets shuffled across the patients, mean over 1,000 permutations, with the one-sided permutation "
                      "p-value of own ≤ shuffled: a template naming the cohort's common features scores the same on both), "
                      "the median number of generated tokens and the share cut off at the token limit. Who "
                      "answered: the share of the patients with and without the outcome whose answer was read, and the AUROC "
                      "(x100) over the answered patients alone. The main table scores an unread answer 0.5, so a model that "
                      "answers one outcome more often than the other moves its AUROC away from 50 by answering alone.", ""]  # fmt: skip
        expert = next(iter(found.values()))["expert_most_ranked"]
        lines += [f"**{title}.** The expert's most often top-ranked features: {named(expert)}.", "",
                  "| method | n | distinct ŷ | ŷ ≥ 0.5 | names an expert feature | most named | R_att own / shuffled (p) | "
                  "median tokens | cut off | answered: with outcome / without | AUROC on answered (n) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row, p in found.items():
            auroc = p.get("auroc_answered")
            on_answered = "—" if auroc is None else f"{100 * auroc:.1f} ({p['answered']})"
            lines.append(f"| {row} | {p['patients']} | {p['distinct_yhat']} | {share(p['share_yhat_positive'])} | "
                         f"{share(p['share_naming_expert'])} | {named(p['most_named'])} | {_shuffled_text(p.get('r_att_shuffled'))} | "
                         f"{p['median_new_tokens'] or '—'} | "
                         f"{share(p['share_cut_off'])} | {share(p.get('answered_with_outcome'))} / "
                         f"{share(p.get('answered_without_outcome'))} | {on_answered} |")  # fmt: skip
        lines.append("")
    return lines


def _synthetic_markdown(check: Optional[dict[str, Any]], fmt) -> list[str]:
    """The mechanism-check section (``synthetic_check``), or nothing when the synthetic runs are absent."""
    if not check:
        return []
    lines = ["## Mechanism check: the synthetic cohort", "",
             "Generated patients whose outcome follows a known rule over Lactate, Creatinine and Albumin "
             "(`eagrl.data.synthetic`). If the pipeline learns, the expert attends to those three, EAG-RL learns to name them "
             "(R_att rises) and predicts better than GRPO, which is not told about them.", ""]  # fmt: skip
    expert = check.get("expert")
    if expert:
        lines += [f"Expert (ConCare) attention on the rule's variables: {100 * expert['attention_on_rule_positives']:.0f}% of the weight "
                  f"for positive patients, {100 * expert['attention_on_rule_negatives']:.0f}% for negative ones; "
                  f"{100 * expert['top_k_slots_on_rule']:.0f}% of all top-k slots.", ""]  # fmt: skip
    lines += ["| method | AUROC | AUPRC | n | strict parse | R_att |", "|---|---|---|---|---|---|"]
    for row, _ in SYNTHETIC_ROWS:
        c = check["rows"].get(row)
        lines.append(f"| {row} | " + " | ".join(fmt(c)) + f" | {_parse_and_r_att_text(c)} |")
    lines += ["", "| a − b | ΔAUROC | ΔAUPRC | n |", "|---|---|---|---|"]
    for pair, d in check["paired"].items():
        if d is None:
            lines.append(f"| {pair} | — | — | — |")
        elif "delta_auroc" not in d:
            lines.append(f"| {pair} | n/a | n/a | {d['patients']} |")
        else:
            lines.append(f"| {pair} | {_delta_text(d, 'auroc')} | {_delta_text(d, 'auprc')} | {d['patients']} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------ plots
def _plot_curves(runs: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    written = []
    for key, title, folder, suffix in ALL_COLUMNS:
        curves = []
        for row, name in MAIN:
            found = predictions(runs / folder / f"{name}{suffix}")
            if found is None or len(set(found[1])) < 2:
                continue
            probs, labels = torch.tensor(found[0], dtype=torch.float), torch.tensor(found[1])
            curves.append((row, binary_roc(probs, labels), binary_precision_recall_curve(probs, labels)))
        if not curves:
            continue
        figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
        for row, (fpr, tpr, _), (precision, recall, _) in curves:
            roc_axis.plot(fpr.numpy(), tpr.numpy(), label=row)
            pr_axis.plot(recall.numpy(), precision.numpy(), label=row)
        roc_axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {title}")
        pr_axis.set(xlabel="recall", ylabel="precision", title=f"PR, {title}")
        pr_axis.legend(fontsize=8, loc="lower left")
        figure.tight_layout()
        written.append(_save(figure, out / f"roc_pr_{key}.png"))
    return written


def _plot_calibration(results: dict[str, Any], out: Path) -> list[str]:
    """``calibration.png``: a reliability diagram per dataset (mean ŷ against the observed share per bin)."""
    table = results.get("calibration") or {}
    if not table:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {key: title for key, title, *_ in ALL_COLUMNS}
    figure, axes = plt.subplots(1, len(table), figsize=(4.6 * len(table), 4.4), squeeze=False)
    for axis, (key, rows) in zip(axes[0], table.items()):
        for row, c in rows.items():
            xs = [b["mean_prediction"] for b in c["bins"]]
            ys = [b["observed"] for b in c["bins"]]
            axis.plot(xs, ys, marker="o", markersize=3, label=f"{row} (ECE {c['ece']:.2f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed share of outcomes", title=titles[key])
        axis.legend(fontsize=6, loc="upper left")
    figure.tight_layout()
    return [_save(figure, out / "calibration.png")]


def _save(figure, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path.name


def _plot_robustness(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for row, _ in ROBUST_METHODS:
        points = [(p, results["robustness"][row][str(p)]) for p in SHUFFLED]
        for axis, metric in zip(axes, ("auroc", "auprc")):
            xs = [p for p, c in points if c and c[metric] is not None]
            ys = [100 * c[metric] for p, c in points if c and c[metric] is not None]
            if xs:
                axis.plot(xs, ys, marker="o", label=row)
                drawn = True
    if not drawn:
        plt.close(figure)
        return []
    for axis, metric in zip(axes, ("AUROC", "AUPRC")):
        axis.set(xlabel="feature order shuffled (%)", ylabel=metric, title=f"{metric} vs shuffled order (TJH)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return [_save(figure, out / "robustness.png")]


def _plot_cross(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    rows = [(row, results["cross_dataset"][row]) for row, _ in CROSS]
    rows = [(row, c) for row, c in rows if c is not None]
    if not rows:
        return []
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.38
    for k, metric in enumerate(("auroc", "auprc")):
        values = [100 * (c[metric] or 0.0) for _, c in rows]
        errors = [100 * (c[f"{metric}_std"] or 0.0) for _, c in rows]
        axis.bar([i + (k - 0.5) * width for i in range(len(rows))], values, width, yerr=errors, label=metric.upper())
    axis.set_xticks(range(len(rows)), [row for row, _ in rows], fontsize=8)
    axis.set(ylabel="x100", title="Trained on MIMIC-IV mortality, tested on TJH (ConCare: not applicable)")
    axis.legend()
    figure.tight_layout()
    return [_save(figure, out / "cross_dataset.png")]


def _version(folder: Path) -> tuple[int, str]:
    """Sort key of a logger folder: ``version_10`` after ``version_9``."""
    number = folder.name.rsplit("_", 1)[-1]
    return (int(number) if number.isdigit() else -1, folder.name)


def _metrics_csv(run: Path) -> list[dict[str, str]]:
    """The logged training rows of ``run``; none while its fit is running. A fit resumed from a checkpoint logs into a
    new ``logs/version_<N>``: the versions are read in order, each replacing the rows of the earlier ones from its
    first step on (those a killed fit logged after its last checkpoint, trained again on resume; all of them when the
    fit started over)."""
    files = sorted(run.glob("logs/*/metrics.csv"), key=lambda f: _version(f.parent))
    if not files or is_unfinished(run):
        return []
    rows: list[dict[str, str]] = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            fresh = [r for r in csv.DictReader(handle) if r.get("train/reward")]
        if fresh:
            first = int(fresh[0]["step"])
            rows = [r for r in rows if int(r["step"]) < first] + fresh
    return rows


def reward_trend(rewards: list[float], window: int = 5) -> Optional[dict[str, float]]:
    """Whether a training reward curve moved beyond its noise: the mean of the last ``window`` rollouts minus the mean
    of the first ``window``, its standard error (from the two windows' sample variances) and their ratio z. None
    with fewer than ``2 * window`` rollouts."""
    if len(rewards) < 2 * window:
        return None
    first, last = rewards[:window], rewards[-window:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    var = lambda xs: sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
    se = math.sqrt(var(first) / window + var(last) / window)
    diff = mean(last) - mean(first)
    return {"rollouts": len(rewards), "first": mean(first), "last": mean(last), "difference": diff, "se": se,
            "z": diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)}  # fmt: skip


def flat_groups(varied: list[float], window: int = 5) -> Optional[dict[str, float]]:
    """The share of rollout groups whose G rewards were all equal (zero advantage: no gradient from the reward, only
    from a KL term), from a run's ``train/groups_varied`` curve: its mean over the first and the last ``window``
    rollouts. A last share near 1 is a policy whose completions all score alike: one answer for every completion, or
    none parsed. None with fewer than ``2 * window`` rollouts."""
    if len(varied) < 2 * window:
        return None
    return {"first": 1 - sum(varied[:window]) / window, "last": 1 - sum(varied[-window:]) / window}


def reward_trends(runs: Path) -> dict[str, dict[str, Optional[dict[str, Any]]]]:
    """Per dataset, per RL variant (with its extra seeds): ``reward_trend`` of its ``train/reward`` curve, with
    ``flat_groups`` under ``flat`` where the run logged ``train/groups_varied``."""
    out: dict[str, dict[str, Optional[dict[str, Any]]]] = {}
    for key, _, folder, suffix in ALL_COLUMNS:
        for row, name in RL_VARIANTS:
            for run in [runs / folder / f"{name}{suffix}", *sorted((runs / folder).glob(f"{name}{suffix}_seed*"))]:
                rows = _metrics_csv(run)
                if rows:
                    label = row if run.name == f"{name}{suffix}" else f"{row} ({run.name.rsplit('_', 1)[1]})"
                    trend: Optional[dict[str, Any]] = reward_trend([float(r["train/reward"]) for r in rows])
                    varied = [float(r["train/groups_varied"]) for r in rows if r.get("train/groups_varied") not in (None, "", "nan")]
                    if trend is not None and len(varied) == len(rows):
                        trend["flat"] = flat_groups(varied)
                    out.setdefault(key, {})[label] = trend
    return out


RL_PANELS = [  # (metrics.csv column, title); ε(τ) is drawn with the spread of its trajectories (eps_high_min..max)
    ("train/reward", "reward"), ("train/r_cls", "R_cls"), ("train/r_att", "R_att"), ("train/parse_rate", "strict parse rate"),
    ("train/key_entropy", "key-token entropy"), ("train/eps_high", "ε(τ) (upper clip), min-max shaded"),
    ("train/clip_high", "clipped high (fraction)"), ("train/clip_low", "clipped low (fraction)"),
    ("train/groups_varied", "groups with varied rewards (share)"),
]  # fmt: skip


def _plot_rl(runs: Path, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    written = []
    for key, title, folder, suffix in ALL_COLUMNS:
        series = [(row, _metrics_csv(runs / folder / f"{name}{suffix}")) for row, name in RL_VARIANTS]
        series = [(row, rows) for row, rows in series if rows]
        if not series:
            continue
        figure, axes = plt.subplots(3, 3, figsize=(15, 10.5))
        for axis, (column, label) in zip(axes.flat, RL_PANELS):
            for row, rows in series:
                points = [(k, float(r[column])) for k, r in enumerate(rows) if r.get(column) not in (None, "", "nan")]
                if not points:
                    continue
                (line,) = axis.plot(*zip(*points), label=row, linewidth=1)
                if column == "train/eps_high":
                    spread = [(k, float(r["train/eps_high_min"]), float(r["train/eps_high_max"])) for k, r in enumerate(rows)
                              if r.get("train/eps_high_min") not in (None, "", "nan") and r.get("train/eps_high_max") not in (None, "", "nan")]  # fmt: skip
                    if spread:
                        xs, lows, highs = zip(*spread)
                        axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
            axis.set(xlabel="rollout", title=label)
        axes.flat[0].legend(fontsize=7)
        figure.suptitle(f"RL training curves, {title}")
        figure.tight_layout()
        written.append(_save(figure, out / f"rl_curves_{key}.png"))
    return written


MAIN_RUN_ROWS = {row for row, _ in MAIN}
ABLATION_ONLY = {row for row, name in ABLATIONS if name not in dict(MAIN).values()}  # rows with runs of their own


def carry_over(current: dict[str, Any], previous: dict[str, Any]) -> list[str]:
    """Take from ``previous`` (an earlier ``results.json``) what ``current`` lacks, in place; returns the paths taken.

    Entries are taken whole, never mixed with a fresh one: a main-table cell where this run is absent; what is computed
    from one run (its answers, calibration, subgroups, reward trend, seed runs) only with that run's cell; a paired
    difference or answer difference only when both its runs are taken; a robustness cell (one shuffled run) where its
    run is absent and the method's TJH main-table cell is taken too (a retrained model makes the old shuffled runs
    another model's, and the 0% cell is that run scored on the subset); the synthetic section and the ablation table
    (with its paired differences) only as a whole, when none of their own runs is here."""
    taken: list[str] = []

    def take(section: str, *keys: str) -> None:
        fresh, old = current.setdefault(section, {}), previous.get(section) or {}
        for key in keys[:-1]:
            fresh, old = fresh.setdefault(key, {}), old.get(key) or {}
        if fresh.get(keys[-1]) is None and old.get(keys[-1]) is not None:
            fresh[keys[-1]] = old[keys[-1]]
            taken.append("/".join((section, *keys)))

    def table(section: str, own) -> None:
        fresh, old = current.get(section), previous.get(section)
        if old and not own(fresh) and own(old):
            current[section] = old
            taken.append(section)

    if current.get("synthetic") is None and previous.get("synthetic") is not None:
        current["synthetic"] = previous["synthetic"]
        taken.append("synthetic")
    for row, cells in (previous.get("main") or {}).items():
        for key in cells or {}:
            take("main", row, key)

    def is_old(row: str, key: str) -> bool:  # the row's run on this dataset comes from the earlier report
        if key == "synthetic":
            return "synthetic" in taken
        return f"main/{row}/{key}" in taken if row in MAIN_RUN_ROWS else True

    for section in ("answers", "calibration", "subgroups", "reward_trends", "seeds"):
        for key, rows in (previous.get(section) or {}).items():
            for row in rows or {}:
                if is_old(row, key):
                    take(section, key, row)
    for section, joiner in (("paired", " − "), ("answer_differences", " vs ")):
        for key, pairs in (previous.get(section) or {}).items():
            for pair in pairs or {}:
                if all(is_old(row, key) for row in pair.split(joiner)):
                    take(section, key, pair)
    for key in previous.get("stage1") or {}:
        if key != "synthetic" or "synthetic" in taken:
            take("stage1", key)
    for row in previous.get("cross_dataset") or {}:
        take("cross_dataset", row)
    table("ablation", lambda t: any((t or {}).get(row) is not None for row in ABLATION_ONLY))
    if "ablation" in taken and previous.get("ablation_paired") is not None:  # its paired differences go with the table
        current["ablation_paired"] = previous["ablation_paired"]
        taken.append("ablation_paired")
    main_row = {name: row for row, name in MAIN}
    for row, name in ROBUST_METHODS:  # cell by cell (each is one run), and only with the TJH run of the model they test
        if is_old(main_row[name], "tjh"):
            for percent in (previous.get("robustness") or {}).get(row) or {}:
                take("robustness", row, percent)
    return taken


def build(runs: Path, out: Path, previous: Optional[Path] = None) -> dict[str, Any]:
    """Write ``results.md``, ``results.json`` and the plots under ``out``; return what ``results.json`` holds.

    ``previous``: an earlier ``results.json``; what the runs under ``runs`` lack is taken from it (``carry_over``: a
    run directory is not kept between machines, the report is), and the report's header lists each entry taken with
    the report it first came from."""
    earlier = _read_previous(previous) if previous is not None else None
    out.mkdir(parents=True, exist_ok=True)
    results = collect(runs)
    facts = _run_facts(runs)
    if earlier:
        try:
            old = earlier.get("facts") or {}
            usable = {k: v for k, v in earlier.items() if k not in ("facts", "plots")}
            older = read_the_older_way(old)
            if older:  # LLM answers read the older way: only what no answer decided is carried, and no earlier plot
                usable = without_llm_entries(usable)
                runs_named = "every run (written before answer_reading existed)" if older == ["*"] else ", ".join(older)
                facts["not_carried"] = f"the LLM entries and plots of {previous}, whose answers were read the older way (the last number anywhere): {runs_named}"
            taken = carry_over(results, usable)
            origin = {"generated": old.get("generated"), "git_revision": old.get("git_revision")}
            before = {e["path"]: e for e in (old.get("carried_over") or {}).get("entries", []) if isinstance(e, dict)}
            entries = [{**origin, **_first_entry(before, path), "path": path} for path in taken]  # an entry keeps its first report
            if entries:
                facts["carried_over"] = {"from": str(previous), "entries": entries}
            markdown(results, facts)  # an earlier file this version cannot read fails here, before anything is written
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise EAGRLInputError(f"--previous {previous}: not a results.json this version can read ({type(err).__name__}: {err})") from None
    results["plots"] = _plot_curves(runs, out) + _plot_calibration(results, out) + _plot_robustness(results, out) + _plot_cross(results, out) + _plot_rl(runs, out)
    if earlier and "not_carried" not in facts:  # its plots of runs not here stay (the files are not rewritten)
        results["plots"] += [name for name in earlier.get("plots", []) if name not in results["plots"] and (out / name).is_file()]
    results["facts"] = facts
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", markdown(results, facts))
    return results


def _first_entry(before: dict[str, dict], path: str) -> dict:
    """The earlier report's entry for ``path``, or for the nearest section holding it (an entry taken whole before and
    cell by cell now, e.g. ``robustness`` -> ``robustness/EAG-RL/20``, keeps the report it first came from)."""
    parts = path.split("/")
    for end in range(len(parts), 0, -1):
        if "/".join(parts[:end]) in before:
            return before["/".join(parts[:end])]
    return {}


def _read_previous(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EAGRLInputError(f"--previous {path}: no such results.json")
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EAGRLInputError(f"--previous {path}: not a results.json ({err})") from None
    if not isinstance(earlier, dict) or "main" not in earlier:
        raise EAGRLInputError(f"--previous {path}: not a results.json (expected an object with a 'main' table)")
    return earlier


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write results.md, results.json and the plots from the run directories.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the runs root of make reproduce")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where to write the results")
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier results.json: cells whose runs are not under --runs are taken from it, and listed")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        raise SystemExit(f"error: {args.runs} does not exist: run the pipeline first (make reproduce)")
    try:
        results = build(args.runs, args.out, args.previous)
    except EAGRLInputError as err:
        raise SystemExit(f"error: {err}") from None
    found = sum(c is not None for row in results["main"].values() for c in row.values())
    if results["facts"].get("unfinished"):
        print(f"warning: left out, not ended: {', '.join(results['facts']['unfinished'])}")
    if len(set((results["facts"].get("generation_dtype") or {}).values())) > 1:
        print(f"warning: the LLM runs generated in different dtypes; see {args.out / 'results.md'}")
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'} and {len(results['plots'])} plots ({found} main-table runs found)")


if __name__ == "__main__":
    main()
