"""Fuzzing the completion -> parse -> reward path with generated LLM completions (seeded, deterministic).

Some 12k completions (empty, 20k+ characters, random Unicode, nested and unclosed tags, probabilities
written as ``NaN``/``1e309``/``150%``/``½``/Arabic-Indic digits/thousands separators, feature lists of
unknown, duplicate, empty, case- and space-mangled and very many names, and mixtures of these) go through
``parse_answer``, ``section_span``, every reward under several ``RewardConfig`` settings for both labels,
and, on a short subset, ``key_token_mask``. Nothing may raise; ŷ is None or in [0, 1]; every reward is
finite and within the range the rewards module documents.
"""

from __future__ import annotations

import math
import random
from decimal import Decimal
from fractions import Fraction

import pytest
import torch

from eagrl.data.features import TJH_FEATURES
from eagrl.llm.parsing import ALIASES, FeatureMatcher, parse_answer, parse_probability, section_span
from eagrl.rl.rewards import RewardConfig, attention_alignment, classification_reward, combined_reward
from eagrl.rl.rollout import KEY_TAG, key_token_mask

NAMES = [f.name for f in TJH_FEATURES]
N_COMPLETIONS = 12_000
N_MASKED = 200  # key_token_mask decodes every prefix (quadratic): a short subset only

CONFIGS = [
    RewardConfig(),
    RewardConfig(use_attention=False),
    RewardConfig(lam=0.0, beta=0.0, clip_low=0.49),
    RewardConfig(lam=1.0, beta=2.0, clip_low=1e-6),
    RewardConfig(lam=0.3, beta=10.0, clip_low=0.2, use_attention=False),
]

PROBABILITY_TEXTS = [
    "NaN", "nan", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e-400", "1.5", "-0.3", "150%", "0x1p3", "½",
    "٠.٥", "٧٣٪", "०.७", "𝟎.𝟓", "５０", "1,000", "1,000.5", "0,5", "1.000,5", "12 345", "1_000", "0.73", ".4",
    "73%", "73 percent", "7.3e-1", "1E-2%", "100", "100.0001", "-0", "+0.5", "0.5.5", "0.\u200b5", "1e", "e5",
    "." * 5, "0" * 400 + ".5", "9" * 400, "1" + "0" * 400 + "%", "yes", "No", "YES!", "maybe", "", " ", "%", "-",
]  # fmt: skip
TAGS = [
    "<Important Features>", "</Important Features>", "<important features>", "< Important  Features >",
    "<Important Features", "Important Features>", "<Important\nFeatures>", "<<Important Features>>",
    "<Final Answer>", "</Final Answer>", "<final answer>", "<Final Answer", "<Final  Answer >", "<Subquestion>",
    "</Subquestion>", "<Answer>", "</Answer>", "<Final subquestion>", "<Think>", "</Think>", "<b>", "<>", "< >",
    "</>", "<1>", "<Important Features/>", "<", ">", "</", "<<<", ">>>",
]  # fmt: skip
ODD_CHARACTERS = [
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\t", "\r", "\n", "\v", "\f", "\u200b",
    "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff", "\ufffd", "\xa0", "مرحبا", "שלום", "🙂", "👩🏽‍⚕️",
    "🏳️‍🌈", "ﷺ", "é", "e\u0301", "ß", "İ", "ǅ", "Ω", "µ", "α", "β", "γ", "(", ")", "[", "]", "-", "•", "*",
]  # fmt: skip
WORDS = [
    "the", "patient", "risk", "is", "high", "low", "day", "probability", "and", "or", "score", "lymphocyte",
    "count", "mortality", "Answer:", "Final", "Features", "important", "%", ",", ";", ".", "0.2", "3", "yes", "no",
]  # fmt: skip
EXPERT_SETS = [NAMES[:5], NAMES[10:20], [], NAMES, ["Age"], ["not a feature"]]


# ------------------------------------------------------------------------------------- generator
def random_unicode(rng: random.Random, length: int) -> str:
    """Random code points from the whole range, surrogates excluded."""
    chars = []
    for _ in range(length):
        point = rng.randrange(0x110000 - 0x800)
        chars.append(chr(point if point < 0xD800 else point + 0x800))
    return "".join(chars)


def mangled_name(rng: random.Random) -> str:
    """A feature name as a model might write it: real, aliased, case- or space-mangled, unknown, empty."""
    name = rng.choice(NAMES)
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(list(ALIASES))
    if kind == 1:
        return name.upper() if rng.random() < 0.5 else name.swapcase()
    if kind == 2:
        spaced = name.replace(" ", rng.choice(["  ", "\t", "\xa0", "-", "_", ""]))
        return rng.choice([" ", "  ", "\t", "\xa0", "\u3000"]) + spaced + " "
    if kind == 3:
        return rng.choice(["- ", "* ", "• ", "1. ", "12) "]) + name + rng.choice(["", " (g/L)", " [mmol/L]", " (", ")"])
    if kind == 4:
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))  # unknown
    if kind == 5:
        return rng.choice(["", " ", "()", "-", "1.", "%", "and"])
    if kind == 6:
        return random_unicode(rng, rng.randint(1, 12))
    if kind == 7:
        return name + rng.choice(ODD_CHARACTERS) + name
    return name


def feature_list(rng: random.Random) -> str:
    regime = rng.random()
    count = rng.randint(0, 6) if regime < 0.7 else rng.randint(20, 80) if regime < 0.95 else rng.randint(200, 600)
    names = [mangled_name(rng) for _ in range(count)]
    if names and rng.random() < 0.3:
        names += rng.choices(names, k=rng.randint(1, 10))  # duplicates
    separators = [", ", ",", "; ", "\n", " and ", ",,", " AND ", " / ", " "]
    return "".join(name + rng.choice(separators) for name in names)


def well_formed(rng: random.Random) -> str:
    """The decomposition format, with random content in each section."""
    steps = "".join(
        f"<Subquestion> {' '.join(rng.choices(WORDS, k=5))}?\n<Answer> {rng.choice(PROBABILITY_TEXTS)} {rng.choice(WORDS)}\n"
        for _ in range(rng.randint(0, 4))
    )
    return (
        f"{steps}<Final subquestion> {' '.join(rng.choices(WORDS, k=4))}\n"
        f"<Important Features> {feature_list(rng)}\n<Final Answer> {rng.choice(PROBABILITY_TEXTS)}"
    )


def soup(rng: random.Random, pieces: int) -> str:
    """Tags, probabilities, words, feature names and odd characters in random order."""
    parts = []
    for _ in range(pieces):
        kind = rng.randrange(6)
        if kind == 0:
            parts.append(rng.choice(TAGS))
        elif kind == 1:
            parts.append(rng.choice(PROBABILITY_TEXTS))
        elif kind == 2:
            parts.append(rng.choice(WORDS))
        elif kind == 3:
            parts.append(mangled_name(rng))
        elif kind == 4:
            parts.append(rng.choice(ODD_CHARACTERS))
        else:
            parts.append(random_unicode(rng, rng.randint(1, 5)))
    return rng.choice(["", " ", "\n"]).join(parts)


def long_completions(rng: random.Random) -> list[str]:
    """A few completions of 20k+ characters."""
    return [
        well_formed(rng) * 60 + "<Final Answer> 0.5",
        "<Important Features> " + ", ".join(mangled_name(rng) for _ in range(3000)) + " <Final Answer> 0.9",
        "<Important Features>" * 2000 + "Age" + "<Final Answer>" * 2000,
        soup(rng, 6000),
        random_unicode(rng, 25_000),
        "0.5 " * 6000 + "<Final Answer> nan",
        "<Important Features> Age" + " " * 20_000,  # a section never closed, then a long run of spaces
        "<Final Answer" + " " * 20_000,  # a tag never closed: TAG's lazy name + \s* backtrack quadratically here
        "<Final Answer> " + "9" * 30_000,
    ]


def completions(n: int) -> list[str]:
    rng = random.Random(0)
    texts = ["", " ", "\n\n", "\x00", "<>", "<Final Answer>", "<Important Features>", *long_completions(rng)]
    texts += [f"<Final Answer> {p}" for p in PROBABILITY_TEXTS] + [f"Probability: {p}" for p in PROBABILITY_TEXTS]
    texts += [f"<Important Features> Age <Final Answer> {p} </Final Answer>" for p in PROBABILITY_TEXTS]
    while len(texts) < n:
        kind = rng.randrange(10)
        if kind < 3:
            text = well_formed(rng)
        elif kind < 6:
            text = soup(rng, rng.randint(0, 40))
        elif kind == 6:
            text = random_unicode(rng, rng.randint(0, 300))
        elif kind == 7:  # tags nested, doubled, closed without opening, never closed
            parts = [rng.choice(TAGS) + (feature_list(rng) if rng.random() < 0.5 else soup(rng, 3)) for _ in range(rng.randint(1, 8))]
            text = "".join(parts)
        elif kind == 8:  # a well-formed answer cut at a random point, or with junk spliced in
            text = well_formed(rng)
            cut = rng.randint(0, len(text))
            text = text[:cut] if rng.random() < 0.5 else text[:cut] + soup(rng, 5) + text[cut:]
        else:
            makers = [well_formed, lambda r: soup(r, 10), lambda r: random_unicode(r, 20)]
            text = "".join(rng.choice(makers)(rng) for _ in range(3))
        texts.append(text)
    return texts


@pytest.fixture(scope="module")
def fuzzed() -> list[str]:
    return completions(N_COMPLETIONS)


@pytest.fixture(scope="module")
def parsed(fuzzed):
    """``(probabilities, feature lists)`` of every completion; the parsing contract is checked on the way."""
    matcher = FeatureMatcher(NAMES)
    known = set(NAMES)
    failures, probabilities, features = [], [], []
    for text in fuzzed:
        try:
            answer = parse_answer(text, matcher)
            p = answer.probability
            assert p is None or (isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0), p
            assert parse_probability(text) == p or (p is None and parse_probability(text) is None)
            older = parse_probability(text, anywhere=True)  # the older reading: the same contract, and the span's answer when tagged
            assert older is None or (isinstance(older, float) and math.isfinite(older) and 0.0 <= older <= 1.0), older
            assert p is None or older == p
            assert len(set(answer.features)) == len(answer.features) and set(answer.features) <= known
            assert answer.unknown_features >= 0 and len(answer.features) + answer.unknown_features <= 200
            for tag in (KEY_TAG, "Final Answer", "Subquestion"):
                span = section_span(text, tag)
                assert span is None or 0 <= span[0] <= span[1] <= len(text), span
            if section_span(text, KEY_TAG) is None:
                assert answer.features == [] and answer.unknown_features == 0
        except Exception as error:  # noqa: BLE001 - collected with the input that caused it
            failures.append(f"{type(error).__name__}: {error} <- {text[:200]!r}")
            answer = None
        probabilities.append(None if answer is None else answer.probability)
        features.append([] if answer is None else answer.features)
    assert not failures, f"{len(failures)} completions broke the parser, e.g.:\n" + "\n".join(failures[:10])
    return probabilities, features


# ------------------------------------------------------------------------------------------ tests
def test_the_generator_is_deterministic_and_covers_the_cases(fuzzed):
    assert len(fuzzed) >= 10_000
    assert completions(500) == fuzzed[:500]  # seeded: the same texts every run
    assert sum(len(t) >= 20_000 for t in fuzzed) >= 5 and "" in fuzzed
    assert any("\x00" in t for t in fuzzed) and any("\u202e" in t for t in fuzzed) and any("🙂" in t for t in fuzzed)
    for needle in ("1e309", "٠.٥", "½", "150%", "1,000", "0x1p3", "</Important Features>", "<Final subquestion>"):
        assert any(needle in t for t in fuzzed), needle


def test_parsing_holds_its_contract_on_every_completion(fuzzed, parsed):
    probabilities, features = parsed
    assert len(probabilities) == len(features) == len(fuzzed) >= 10_000
    answered = sum(p is not None for p in probabilities)
    assert 0 < answered < len(fuzzed) and any(features)  # the fuzz reaches both branches


def _out_of_range(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ~torch.isfinite(values) | (values < low - 1e-9) | (values > high + 1e-9)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"lam{c.lam}-beta{c.beta}-clip{c.clip_low}-att{c.use_attention}")
def test_every_reward_is_finite_and_within_its_documented_range(fuzzed, parsed, config):
    probabilities, features = parsed
    n = len(fuzzed)
    experts = [EXPERT_SETS[i % len(EXPERT_SETS)] for i in range(n)]
    answered = torch.tensor([p is not None for p in probabilities])
    as_tensor = torch.tensor([math.nan if p is None else p for p in probabilities], dtype=torch.float64)
    # the documented ranges (rewards module docstring), written out rather than read from the config
    high_p = 1.0 - config.clip_low
    r_cls_low, r_cls_high = math.log(config.clip_low), math.log(high_p) + config.beta * (high_p - 0.5)
    if config.use_attention:
        low, high = config.lam * r_cls_low, config.lam * r_cls_high + (1.0 - config.lam)
    else:
        low, high = r_cls_low, r_cls_high
    assert config.r_cls_range == pytest.approx((r_cls_low, r_cls_high)) and config.reward_range == pytest.approx((low, high))

    r_att = attention_alignment(features, experts)
    assert r_att.shape == (n,) and not _out_of_range(r_att, 0.0, 1.0).any()
    for label in (0, 1):
        labels = [label] * n
        r_cls = classification_reward(probabilities, labels, config)
        assert torch.equal(r_cls, classification_reward(as_tensor, torch.tensor(labels), config))  # list and tensor agree
        out = combined_reward(probabilities, labels, features, experts, config)
        bad = _out_of_range(r_cls, r_cls_low, r_cls_high) | _out_of_range(out["reward"], low, high)
        bad |= _out_of_range(out["r_cls"], r_cls_low, r_cls_high) | _out_of_range(out["r_att"], 0.0, 1.0)
        examples = [f"{fuzzed[i][:200]!r}: y_hat={probabilities[i]}, R={out['reward'][i].item()}" for i in bad.nonzero()[:5, 0]]
        assert not bad.any(), f"label {label}: {int(bad.sum())} rewards out of [{low}, {high}], e.g. {examples}"
        assert torch.equal(out["parsed"], answered) and torch.equal(out["r_cls"], r_cls) and torch.equal(out["r_att"], r_att)
        # an unparseable answer gets the minimum, whatever its features
        assert torch.allclose(r_cls[~answered], torch.tensor(r_cls_low, dtype=torch.float64))
        assert torch.allclose(out["reward"][~answered], torch.tensor(low, dtype=torch.float64))


def raw_probabilities(rng: random.Random, n: int) -> list:
    """ŷ values a caller might hand the rewards directly, beside the parser's None-or-float."""
    fixed = [
        None, math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 5e-324, math.nextafter(1.0, 2.0), math.nextafter(0.0, -1.0),
        10**400, -(10**400), Fraction(10**400), Fraction(1, 3), Decimal("1e400"), Decimal("NaN"), Decimal("0.3"),
        True, False, "0.5", "nan", "abc", "", b"0.5", 1 + 2j, [0.5], object(),
    ]  # fmt: skip
    drawn = [
        rng.choice([rng.random(), rng.uniform(-1e3, 1e3), float(f"{rng.random():.6f}e{rng.randint(-400, 400)}"), rng.randint(-2, 3)])
        for _ in range(n)
    ]
    return fixed + drawn


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: f"lam{c.lam}-beta{c.beta}-clip{c.clip_low}-att{c.use_attention}")
def test_rewards_of_raw_probabilities_are_finite_and_within_range(config):
    y_hat = raw_probabilities(random.Random(2), 2000)
    n = len(y_hat)
    for label in (0, 1):
        out = combined_reward(y_hat, [label] * n, [["Age"]] * n, [["Age", "Sex"]] * n, config)
        assert not _out_of_range(out["r_cls"], *config.r_cls_range).any()
        assert not _out_of_range(out["reward"], *config.reward_range).any()
    # regression: an int beyond float's range raised OverflowError; it is out of [0, 1], so the minimum
    assert classification_reward([10**400, Fraction(10**400)], [1, 0], config).tolist() == [math.log(config.clip_low)] * 2


def test_key_token_mask_on_short_fuzzed_completions(fuzzed):
    from eagrl.models.backbone import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    short = [t for t in fuzzed if len(t) <= 400]
    rng = random.Random(1)
    failures = []
    for text in rng.sample(short, N_MASKED):
        try:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            mask = key_token_mask(tokenizer, tokens)
            assert len(mask) == len(tokens) and all(isinstance(m, bool) for m in mask)
            span = section_span(tokenizer.decode(tokens, skip_special_tokens=True), KEY_TAG)
            if span is None:
                assert not any(mask)
            elif span[0] < span[1]:
                assert any(mask)
        except Exception as error:  # noqa: BLE001 - collected with the input that caused it
            failures.append(f"{type(error).__name__}: {error} <- {text[:200]!r}")
    assert not failures, f"{len(failures)} completions broke key_token_mask, e.g.:\n" + "\n".join(failures[:10])
