"""Read the prediction ŷ and the important-feature set C out of a completion. Never raises.

Every prompt asks for the answer after a ``<Final Answer>`` tag, so ŷ is read from the text after the
last ``<Final Answer>`` tag (up to the next tag). The probability rule (``parse_probability``) there:

1. the first number (``0.73``, ``.73``, ``73%``, ``73 percent``, ``7.3e-1``) is read: with a percent sign or
   word it is divided by 100; a bare number in [0, 1] is the probability; a bare number in (1, 100] is read
   as a percentage (``73`` -> 0.73); anything else (negative, above 100, ``nan``, ``inf``, ``1e309``) is
   out of range -> None;
2. with no number, the first ``yes`` / ``no`` word gives 1.0 / 0.0;
3. otherwise None (unparsed: evaluation scores it as ``unparsed_probability``, the rewards give it their
   minimum). A completion without the tag is unparsed.

A span that opens with a list number (``1. The patient had 1 visit``, ``2) Sodium``) is an echoed list, not an
answer: the number is skipped and, unless a number or yes / no follows it at once (``1. 0.8``), the span is
unparsed. (A fine-tuned SmolLM2 numbers its lines; read as a number, "1." would be ŷ = 1.)

That is the lenient reading, which evaluation uses (and reports the strict parse rate beside). The reward
path (stage 1's search and stage 2's rollouts) reads strictly (``strict=True``), so that a reward cannot
be earned by accident: the same span, but its first number must be a probability in [0, 1] or a
percentage written with "%" / "percent" (a bare 73 or 1.5 is unparseable), and yes / no words do not count.

``anywhere=True`` is the older evaluation reading, kept to compare with: without the tag it takes the
*last* number (else the last yes / no) of the completion's last 2,000 characters (``strict`` ignores it). A small model that never writes the tag
but loops over the patient's record ("... on day 15 of the stay", "value 1.0") then gets ŷ from echoed
patient data (0.15, 1.0), which is a number about the record, not a prediction; do not report it as one.

Feature names (``FeatureMatcher``): the text after the last ``<Important Features>`` tag (up to the next
tag) is split on commas, semicolons, new lines and " and "; each item is normalised (case, spacing,
punctuation, bullets, a trailing parenthesised unit) and looked up among the dataset's feature names and
a small alias table. Unknown names are dropped (and counted); duplicates are kept once.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Optional

TAG = re.compile(r"<\s*/?\s*([A-Za-z]+(?: +[A-Za-z]+)*)\s*>")  # linear: no run of spaces is tried two ways
NUMBER = re.compile(r"(?<![\w.])([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?!\d|\.\d)\s*(%|percent\b)?", re.IGNORECASE)
YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
LIST_NUMBER = re.compile(r"\s*\d{1,3}[.)][ \t]+(?=\S)")  # "1. " / "2) " opening a span, text after it on the line

# A small alias table: common ways of writing a feature -> its name in the data (matched after normalising).
ALIASES = {
    # TJH
    "troponin": "Hypersensitive cardiac troponinI",
    "hs ctni": "Hypersensitive cardiac troponinI",
    "hypersensitive cardiac troponin i": "Hypersensitive cardiac troponinI",
    "cardiac troponin": "Hypersensitive cardiac troponinI",
    "ldh": "Lactate dehydrogenase",
    "crp": "High sensitivity C-reactive protein",
    "hs crp": "High sensitivity C-reactive protein",
    "c reactive protein": "High sensitivity C-reactive protein",
    "d dimer": "D-D dimer",
    "ddimer": "D-D dimer",
    "lymphocyte percentage": "(%)lymphocyte",
    "lymphocyte %": "(%)lymphocyte",
    "lymphocyte (%)": "(%)lymphocyte",
    "lymphocytes": "(%)lymphocyte",
    "lymphocyte": "(%)lymphocyte",
    "neutrophil percentage": "neutrophils(%)",
    "neutrophils": "neutrophils(%)",
    "il 6": "Interleukin 6",
    "il6": "Interleukin 6",
    "il 10": "Interleukin 10",
    "il 8": "Interleukin 8",
    "il 2r": "Interleukin 2 receptor",
    "tnf alpha": "Tumor necrosis factorα",
    "tnf α": "Tumor necrosis factorα",
    "nt probnp": "Amino-terminal brain natriuretic peptide precursor(NT-proBNP)",
    "inr": "International standard ratio",
    "aptt": "Activation of partial thromboplastin time",
    "pt": "Prothrombin time",
    "alt": "glutamic-pyruvic transaminase",
    "ast": "aspartate aminotransferase",
    "ggt": "γ-glutamyl transpeptidase",
    "wbc": "White blood cell count",
    "white blood cells": "White blood cell count",
    "rbc": "Red blood cell count",
    "platelets": "Platelet count",
    "plt": "Platelet count",
    "rdw": "Red blood cell distribution width",
    "ph": "pH (urine or blood sample, source not recorded)",
    "ph value": "pH (urine or blood sample, source not recorded)",
    "sodium": "serum sodium",
    "potassium": "Serum potassium",
    "chloride": "Serum chloride",
    "bicarbonate": "HCO3-",
    "bun": "Urea",
    "esr": "ESR",
    # MIMIC-IV
    "hr": "Heart rate",
    "pulse": "Heart rate",
    "spo2": "Oxygen saturation",
    "o2 saturation": "Oxygen saturation",
    "fio2": "Fraction inspired oxygen",
    "rr": "Respiratory rate",
    "sbp": "Systolic blood pressure",
    "dbp": "Diastolic blood pressure",
    "map": "Mean blood pressure",
    "gcs": "Glasgow coma scale total",
    "gcs total": "Glasgow coma scale total",
    "glasgow coma scale": "Glasgow coma scale total",
    "gcs eye": "Glasgow coma scale eye opening",
    "gcs motor": "Glasgow coma scale motor response",
    "gcs verbal": "Glasgow coma scale verbal response",
    "temp": "Temperature",
    "blood glucose": "Glucose",
    "capillary refill": "Capillary refill rate",
}


def _tag_name(match: re.Match) -> str:
    return " ".join(match.group(1).lower().split())


def section_span(text: str, tag: str) -> Optional[tuple[int, int]]:
    """``(start, end)`` character offsets of the text after the last ``<tag>`` up to the next tag (opening
    or closing) or the end, or None when the tag is absent."""
    if not isinstance(text, str):
        return None
    tags = list(TAG.finditer(text))
    wanted = " ".join(tag.lower().split())
    starts = [i for i, m in enumerate(tags) if _tag_name(m) == wanted and not m.group(0).replace(" ", "").startswith("</")]
    if not starts:
        return None
    i = starts[-1]
    end = tags[i + 1].start() if i + 1 < len(tags) else len(text)
    return tags[i].end(), end


def section(text: str, tag: str) -> Optional[str]:
    """The text after the last ``<tag>`` up to the next tag (opening or closing), or None."""
    span = section_span(text, tag)
    return None if span is None else text[span[0] : span[1]]


def parse_probability(text: str, strict: bool = False, anywhere: bool = False) -> Optional[float]:
    """ŷ in [0, 1] from a completion (the rules in the module docstring; ``strict``: the reward path's;
    ``anywhere``: the older reading that falls back to the last number of a completion without the tag),
    or None."""
    if not isinstance(text, str):
        return None
    region = section(text, "Final Answer")
    tagged = region is not None
    if not tagged and (strict or not anywhere):
        return None
    region = region if tagged else text[-2000:]
    listed = LIST_NUMBER.match(region) if tagged else None
    if listed:
        region = region[listed.end() :]
        if not (NUMBER.match(region) or (not strict and YES_NO.match(region))):
            return None  # an echoed numbered list, not an answer
    numbers = list(NUMBER.finditer(region))
    if numbers:
        match = numbers[0] if tagged else numbers[-1]
        try:
            value = float(match.group(1))
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        if match.group(2):
            value /= 100.0
        elif 1.0 < value <= 100.0 and not strict:
            value /= 100.0
        return value if 0.0 <= value <= 1.0 else None
    if strict:
        return None
    if re.search(r"\bnan\b|\binf", region, re.IGNORECASE):
        return None
    words = list(YES_NO.finditer(region))
    if words:
        word = words[0] if tagged else words[-1]
        return 1.0 if word.group(1).lower() == "yes" else 0.0
    return None


def normalise_name(name: str) -> str:
    """Lower case, Unicode-folded, punctuation and bullets to spaces, one space between words."""
    text = unicodedata.normalize("NFKC", str(name)).lower()
    text = re.sub(r"^\s*(?:[-*•]+|\d+[.)])\s*", "", text)  # a bullet or "1." / "1)"
    text = re.sub(r"[\"'`“”‘’]", "", text)
    text = re.sub(r"[^\w%#]+", " ", text)
    return " ".join(text.split())


@dataclass
class FeatureMatcher:
    """Maps written feature names onto the dataset's names.

    Args:
        names: the dataset's feature names.
        aliases: extra ``written form -> feature name`` pairs (added to ``ALIASES``; only those whose
            target is in ``names`` are used).
    """

    names: list[str]
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = set(self.names)
        table: dict[str, str] = {}
        for written, target in {**ALIASES, **self.aliases}.items():
            if target in known:
                table[normalise_name(written)] = target
        for name in self.names:
            table[normalise_name(name)] = name
            table[normalise_name(name).replace(" ", "")] = name
            stripped = normalise_name(re.sub(r"\(.*?\)", " ", name))  # "neutrophils(%)" -> "neutrophils"
            table.setdefault(stripped, name)
        self.table = table
        # names that hold a list separator (TJH's "pH (urine or blood sample, source not recorded)"): read whole
        self.protected = [n for n in self.names if re.search(r"[,;\n]|\band\b", n)]

    def match(self, written: str) -> Optional[str]:
        key = normalise_name(written)
        if not key:
            return None
        found = self.table.get(key) or self.table.get(key.replace(" ", ""))
        if found is None:
            without_unit = normalise_name(re.sub(r"\(.*?\)|\[.*?\]", " ", str(written)))
            found = self.table.get(without_unit)
        return found

    def parse(self, text: str) -> tuple[list[str], int]:
        """``(matched names in order of mention, count of unknown items)`` from a completion."""
        region = section(text, "Important Features")
        if region is None:
            return [], 0
        region = region.replace("\x00", " ")  # the placeholder below is never the model's own text
        for k, name in enumerate(self.protected):
            region = re.sub(re.escape(name), f" \x00{k}\x00 ", region, flags=re.IGNORECASE)
        items = [item for item in re.split(r"[,;\n]|\band\b", region) if item.strip()]
        found: list[str] = []
        unknown = 0
        for item in items[:200]:  # a runaway list is cut, not walked forever
            whole = re.fullmatch(r"\s*\x00(\d+)\x00\s*", item)
            protected = whole is not None and int(whole.group(1)) < len(self.protected)
            name = self.protected[int(whole.group(1))] if protected else self.match(item)
            if name is None:
                unknown += 1
            elif name not in found:
                found.append(name)
        return found, unknown


@dataclass
class ParsedAnswer:
    """What a completion says: ŷ read leniently (evaluation) and strictly (the rewards; None when
    unparseable), the named features, the count of named items that are not features of the dataset."""

    probability: Optional[float]
    features: list[str]
    unknown_features: int
    strict_probability: Optional[float] = None


def parse_answer(text: str, matcher: FeatureMatcher, anywhere: bool = False) -> ParsedAnswer:
    """``anywhere``: read the lenient ŷ the older way (see ``parse_probability``); the strict one never is."""
    if not isinstance(text, str):
        return ParsedAnswer(None, [], 0, None)
    features, unknown = matcher.parse(text)
    return ParsedAnswer(parse_probability(text, anywhere=anywhere), features, unknown, parse_probability(text, strict=True))


def parse_answers(texts: Iterable[str], matcher: FeatureMatcher, anywhere: bool = False) -> list[ParsedAnswer]:
    return [parse_answer(text, matcher, anywhere) for text in texts]
