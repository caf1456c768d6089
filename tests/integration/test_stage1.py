"""Stage 1 through the real CLI with a tiny random model: distill (determinism, resume) -> SFT."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

DISTILL = ["--config", "configs/tjh/distill.yaml", "--config", "configs/smoke/distill.yaml"]
SFT = ["--config", "configs/tjh/sft.yaml", "--config", "configs/smoke/sft.yaml"]


@pytest.fixture(scope="module")
def expert(tjh_expert):
    return tjh_expert


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _distill(root, expert, session_cache, models, *extra):
    return run_cli(
        "predict", *DISTILL, "--trainer.default_root_dir", str(root), "--model.init_args.expert_attention", str(expert),
        "--model.init_args.backbone.cache_dir", str(models), *extra, cache=session_cache,
    )  # fmt: skip


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, expert, session_cache, models):
    root = tmp_path_factory.mktemp("distill")
    result = _distill(root, expert, session_cache, models)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_distill_writes_trajectories(distilled):
    lines = [json.loads(line) for line in (distilled / "trajectories.jsonl").read_text().splitlines()]
    assert {(r["split"]) for r in lines} == {"train", "val"}
    assert len({r["id"] for r in lines}) == 6  # 1 batch of 3 patients per split (smoke overlay)
    for record in lines:
        for key in ("id", "split", "label", "trajectory", "y_hat", "features", "r_cls", "r_att", "reward", "nodes_expanded", "depth", "tokens_generated"):
            assert key in record
        assert record["trajectory"].startswith("<Subquestion>") and "<Final subquestion>" in record["trajectory"]
        assert record["rank"] in (0, 1) and record["tokens_generated"] > 0
    assert len((distilled / "trajectories.jsonl.done").read_text().split()) == 6


def test_same_seed_same_trees_and_resume_after_a_kill(distilled, tmp_path, expert, session_cache, models):
    full = (distilled / "trajectories.jsonl").read_text()
    again = tmp_path / "again"
    assert _distill(again, expert, session_cache, models).returncode == 0
    assert (again / "trajectories.jsonl").read_text() == full  # same seed, same trees

    # a kill in the middle of the last patient's write: a torn line, and that patient not marked done
    lines = full.splitlines(keepends=True)
    last = json.loads(lines[-1])["id"]
    kept = [line for line in lines if json.loads(line)["id"] != last]
    (again / "trajectories.jsonl").write_text("".join(kept) + lines[-1][:25])
    done = (again / "trajectories.jsonl.done").read_text().split()
    (again / "trajectories.jsonl.done").write_text("".join(f"{i}\n" for i in done if i != last))
    assert _distill(again, expert, session_cache, models).returncode == 0
    assert (again / "trajectories.jsonl").read_text() == full  # nothing lost, nothing twice, nothing torn


def test_bad_search_settings_stop_before_the_search(tmp_path, expert, session_cache, models):
    result = _distill(tmp_path, expert, session_cache, models, "--model.init_args.search.rollouts", "0")
    assert result.returncode == 2 and "rollouts" in result.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "1", "features": [["Heart rate", 1.0]], "top_k": ["Heart rate"]}) + "\n")
    result = _distill(tmp_path, other, session_cache, models)
    assert result.returncode == 2 and "not in this dataset" in result.stderr
    assert not (tmp_path / "trajectories.jsonl").exists()


def test_sft_on_the_distilled_trajectories(distilled, tmp_path, expert, session_cache, models):
    result = run_cli(
        "fit", *SFT, "--trainer.default_root_dir", str(tmp_path), "--data.init_args.trajectories", str(distilled / "trajectories.jsonl"),
        "--model.init_args.expert_attention", str(expert), "--model.init_args.backbone.cache_dir", str(models), cache=session_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # the smoke trajectories are longer than the smoke evaluation's 6 new tokens: the run says so
    assert "SFT trajectories" in result.stderr and "longer than model.sampling.max_new_tokens (6;" in result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("train/loss_epoch", "val/loss", "test/auroc", "test/parse_rate", "val/parse_rate", "test/r_att"):
        assert name in metrics, name
    adapter = load_file(tmp_path / "model/adapter/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it
    assert (tmp_path / "model/merged/model.safetensors").is_file() and (tmp_path / "model/merged/tokenizer.json").is_file()
    assert (tmp_path / "generations.jsonl").is_file() and (tmp_path / "checkpoints/last.ckpt").is_file()

    from eagrl.models.backbone import BackboneOptions, load_backbone

    merged, tokenizer = load_backbone(BackboneOptions(name=str(tmp_path / "model/merged")))  # what stage 2 loads
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_sft_data_balances_and_falls_back_when_one_outcome_is_kept(tmp_path, tjh_module, session_cache, caplog):
    from datamodules import TrajectoryDataModule

    train = tjh_module.datasets["train"]
    by_label = {0: [], 1: []}
    for i in range(len(train)):
        by_label[int(train[i]["label"])].append(train[i]["id"])
    lines = [{"id": i, "split": "train", "label": 1, "trajectory": "t"} for i in by_label[1][:2]]
    lines += [{"id": i, "split": "train", "label": 0, "trajectory": "t"} for i in by_label[0][:5]]
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dm = TrajectoryDataModule(trajectories=str(path), dataset="tjh", cache_dir=str(session_cache), progress=False)
    dm.setup()
    assert sorted(e["label"] for e in dm.examples["train"]) == [0, 0, 1, 1]  # 2 positive, 2 of the 5 negative
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[2:]))  # negatives only
    dm = TrajectoryDataModule(trajectories=str(path), dataset="tjh", cache_dir=str(session_cache), progress=False)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert len(dm.examples["train"]) == 5 and "all of one outcome" in caplog.text


def test_constrained_features_name_only_dataset_variables(distilled, tmp_path, expert, session_cache, models):
    """constrain_features: the tiny random model's <Important Features> become lists of TJH's names (free, it names none),
    so R_att can be > 0 and the search can select for it (with 73 names and a random model, none may match here).
    constrain_answer: its <Final Answer> becomes a probability the strict reward reads (free, it writes none).
    Run in a copy of the free run's directory: its trajectories were written under other settings, so they are moved
    to stale-1/ and every patient is searched again, never mixed with the new ones."""
    from eagrl.data.features import DATASET_FEATURES
    from eagrl.llm.parsing import FeatureMatcher, parse_probability

    free = [json.loads(line) for line in (distilled / "trajectories.jsonl").read_text().splitlines()]
    assert all(r["features"] == [] for r in free)
    assert all(parse_probability(r["trajectory"], strict=True) is None for r in free)
    shutil.copytree(distilled, tmp_path, dirs_exist_ok=True)
    result = _distill(
        tmp_path, expert, session_cache, models, "--model.init_args.constrain_features", "true", "--model.init_args.max_features", "3",
        "--model.init_args.constrain_answer", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "searched under other settings" in result.stderr and "constrain_answer" in result.stderr
    assert (tmp_path / "stale-1" / "trajectories.jsonl").read_text() == (distilled / "trajectories.jsonl").read_text()
    constrained = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in constrained}) == len({r["id"] for r in free})  # every patient searched again
    matcher = FeatureMatcher([f.name for f in DATASET_FEATURES["tjh"]])
    for record in constrained:
        named, unknown = matcher.parse(record["trajectory"])  # TJH's pH name holds a comma: read whole
        assert 1 <= len(named) <= 3 and unknown == 0, record["trajectory"][-300:]
        assert record["features"] == named
        assert parse_probability(record["trajectory"], strict=True) == record["y_hat"] is not None
