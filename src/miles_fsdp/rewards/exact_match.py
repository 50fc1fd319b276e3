"""Exact-match grader: extract an answer from the response, normalise, compare to the label.

Extraction modes:
    "full"          the whole response
    "after_marker"  text after the last marker (GSM8K's "####")
    "last_number"   the last number in the text (commas in numbers allowed)
    "boxed"         contents of the last \\boxed{...}
Normalisation: strip, lowercase, drop "$" and a trailing ".", collapse whitespace;
numbers compare by value ("1,000" == "1000.0").
"""

import re
from collections.abc import Callable
from typing import Literal

from miles_fsdp.data.sample import Sample

Extract = Literal["full", "after_marker", "last_number", "boxed"]
EXTRACTS = ("full", "after_marker", "last_number", "boxed")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str, how: Extract = "last_number", marker: str = "####") -> str | None:
    """The answer span of `text`, or None when the mode finds nothing."""
    if how == "full":
        return text
    if how == "after_marker":
        return text.rsplit(marker, 1)[1] if marker in text else None
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    if how == "boxed":
        return last_boxed(text)
    raise ValueError(f"unknown exact_match extraction {how!r}; expected one of {EXTRACTS}")


def normalize(text: str) -> str:
    s = " ".join(text.replace("$", "").strip().lower().split()).rstrip(".").strip()
    if _NUMBER.fullmatch(s):
        value = float(s.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return s


def make_exact_match(extract: Extract = "last_number", marker: str = "####") -> Callable[[Sample], float]:
    """A reward (sample) -> 1.0/0.0 comparing the extracted response answer with the label."""
    if extract not in EXTRACTS:
        raise ValueError(f"unknown exact_match extraction {extract!r}; expected one of {EXTRACTS}")

    def exact_match_reward(sample: Sample) -> float:
        if sample.label is None:
            raise ValueError("exact_match reward needs a label; set DataConfig.label_key to the answer column")
        answer = extract_answer(sample.response, extract, marker)
        if answer is None:
            return 0.0
        return 1.0 if normalize(answer) == normalize(sample.label) else 0.0

    return exact_match_reward


exact_match_reward = make_exact_match()
