"""Math grader: math-verify parses the label and the response, then checks equivalence.

Only the response's last \\boxed{...} is graded when there is one (a model may box
intermediate results); otherwise math-verify searches the whole response. Returns 1.0 when equivalent, else 0.0.
"""

import threading

from miles_fsdp.data.sample import Sample
from miles_fsdp.rewards.exact_match import last_boxed

TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only works on the main thread; reward
    # threads (registry.score_samples) run without it
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_label(label: str) -> list:
    """Parse a reference answer; bare expressions like "1/2" are tried as $...$ LaTeX too."""
    from math_verify import parse  # imported on use: only runs that grade math need math-verify

    timeout = _timeout()
    gold = parse(label, parsing_timeout=timeout)
    if not gold:
        gold = parse(f"${label}$", parsing_timeout=timeout)
    return gold


def math_reward(sample: Sample) -> float:
    """1.0 if the response's answer is mathematically equal to `sample.label`, else 0.0."""
    if sample.label is None:
        raise ValueError("math reward needs a label; set DataConfig.label_key to the answer column")
    from math_verify import parse, verify

    gold = parse_label(sample.label)
    if not gold:
        raise ValueError(f"math reward cannot parse the label {sample.label!r} as math")
    boxed = last_boxed(sample.response)
    text = sample.response if boxed is None else f"$\\boxed{{{boxed}}}$"
    answer = parse(text, parsing_timeout=_timeout())
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=_timeout()) else 0.0
