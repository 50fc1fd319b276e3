"""Built-in graders: math (math-verify) and exact match."""

import pytest

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards.exact_match import extract_answer, last_boxed, make_exact_match, normalize
from miles_fsdp.rewards.math import math_reward


def s(response, label):
    return Sample(prompt="q", response=response, label=label)


@pytest.mark.parametrize(
    "response, label, expect",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
        ("first \\boxed{2} then \\boxed{3}", "3", 1.0),
        ("the answer is \\boxed{3}", "4", 0.0),
        ("I do not know", "1/2", 0.0),
    ],
)
def test_math_reward(response, label, expect):
    assert math_reward(s(response, label)) == expect


def test_math_reward_needs_label():
    with pytest.raises(ValueError, match="label_key"):
        math_reward(s("\\boxed{1}", None))


def test_extraction_modes():
    assert extract_answer("work... #### 72", "after_marker").strip() == "72"
    assert extract_answer("no marker", "after_marker") is None
    assert extract_answer("3 apples and 1,200 pears.", "last_number") == "1,200"
    assert extract_answer("x \\boxed{\\frac{a}{b}} y", "boxed") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    with pytest.raises(ValueError, match="unknown exact_match extraction 'first'"):
        make_exact_match("first")


def test_normalize():
    assert normalize(" The  Answer. ") == "the answer"
    assert normalize("1,000") == normalize("1000.0") == "1000"
    assert normalize("$3.50$") == "3.5"


def test_exact_match_rewards():
    last_number = make_exact_match()
    assert last_number(s("so 1,000 apples.", "1000")) == 1.0
    assert last_number(s("so 999 apples", "1000")) == 0.0
    assert last_number(s("no number", "1000")) == 0.0
    marker = make_exact_match("after_marker")
    assert marker(s("2 + 2 = 4 #### 4", "4")) == 1.0
    assert marker(s("4", "4")) == 0.0
    full = make_exact_match("full")
    assert full(s("  Paris. ", "paris")) == 1.0
