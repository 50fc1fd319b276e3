"""The Sample: one prompt and one response, the record that flows rollout -> reward -> train.

Worked example (group_size n = 2, the second group of a rollout batch):

    Sample(
        group_index=1, index=2,                    # sample 2 of the batch = group 1, member 0
        prompt=[{"role": "user", "content": "1+1?"}],
        label="2",
        prompt_ids=[151644, 872, 198, 16, 10, 16, 30],   # chat template applied, [P]
        response="\\boxed{2}",
        response_ids=[59, 79075, 90, 17, 92, 151645],    # [R]
        response_logprobs=[-0.3, -0.01, -0.02, -0.5, -0.01, -0.1],  # [R] fp32, sampled dist
        loss_mask=[1, 1, 1, 1, 1, 1],              # [R] 0 on tool/env tokens
        reward=1.0, status=Status.COMPLETED, weight_version=7,
    )

Samples of a group are contiguous in a batch: index // n == group_index.
"""

import enum
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

Message = dict[str, str]
"""One chat message: {"role": ..., "content": ...}."""


class Status(enum.Enum):
    PENDING = "pending"
    """Not generated yet (fresh from the dataset, or re-queued)."""
    COMPLETED = "completed"
    """Stopped on an EOS / stop token or string."""
    TRUNCATED = "truncated"
    """Hit max_new_tokens (or the context limit): the response is cut, still trainable;
    overlong shaping (rl/filters.py) may penalise it."""
    ABORTED = "aborted"
    """Generation was cancelled (e.g. dynamic sampling already had enough groups, or
    shutdown). The partial response is discarded, never trained on."""
    FAILED = "failed"
    """The engine or a custom generate hook raised. A multi-turn sample may still hold
    usable partial output (earlier turns); the loop decides, and it is counted."""


@dataclass(slots=True)
class Sample:
    prompt: str | list[Message]
    """Raw prompt: plain text or a chat message list, as read from the dataset."""
    group_index: int = 0
    """Which prompt group of the rollout batch this sample belongs to."""
    index: int = 0
    """Position in the rollout batch (groups contiguous: index // n == group_index)."""
    label: str | None = None
    """Reference answer for the reward function (None for unlabelled prompts)."""
    prompt_ids: list[int] = field(default_factory=list)
    """[P] prompt token ids after the chat template."""
    response: str = ""
    """Decoded response text (model and tool tokens)."""
    response_ids: list[int] = field(default_factory=list)
    """[R] response token ids: model tokens and, in multi-turn rollouts, tool/env tokens."""
    response_logprobs: list[float] = field(default_factory=list)
    """[R] log-prob of each response token under the sampling distribution; 0.0 on non-model tokens."""
    loss_mask: list[int] = field(default_factory=list)
    """[R] 1 on tokens trained on (model tokens), 0 on tool/env tokens."""
    reward: float | None = None
    """Scalar reward, set by the reward step (None until scored)."""
    status: Status = Status.PENDING
    seed: int | None = None
    """The request seed it was sampled with: with the prompt and `index` within its group it
    replays the sample exactly (engine/replay.py)."""
    reward_error: str | None = None
    """Why `reward` is the run's reward_on_error score: the reward function raised, returned
    a non-number or timed out (the message says which); None when it scored the sample."""
    weight_version: int | None = None
    """Engine weight version that generated the response."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Dataset columns chosen by `DataConfig.metadata_keys`, for user rewards and hooks.
    Framework code never reads this dict: a field it relies on gets a typed attribute."""

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    def check(self) -> None:
        """Raise if the per-token lists disagree in length (a broken rollout or hook)."""
        r = len(self.response_ids)
        if len(self.response_logprobs) != r or len(self.loss_mask) != r:
            raise ValueError(
                f"sample {self.index} (group {self.group_index}): response_ids has {r} tokens but "
                f"response_logprobs has {len(self.response_logprobs)} and loss_mask {len(self.loss_mask)}; "
                "all three must have one entry per response token"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (status as its string value), inverse of `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        """Strict inverse of `to_dict`: unknown keys are an error, never attached silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Sample.from_dict: unknown keys {unknown}; expected a subset of {sorted(known)}")
        if "prompt" not in data:
            raise ValueError("Sample.from_dict: missing required key 'prompt'")
        kwargs = dict(data)
        if "status" in kwargs:
            try:
                kwargs["status"] = Status(kwargs["status"])
            except ValueError:
                valid = [s.value for s in Status]
                raise ValueError(f"Sample.from_dict: status {kwargs['status']!r} is not one of {valid}") from None
        return cls(**kwargs)


def make_group(prompt_sample: Sample, group_size: int, group_index: int) -> list[Sample]:
    """n fresh copies of a dataset prompt for one group, indices group_index * n + j."""
    base = group_index * group_size
    return [
        Sample(
            prompt=prompt_sample.prompt,
            group_index=group_index,
            index=base + j,
            label=prompt_sample.label,
            prompt_ids=list(prompt_sample.prompt_ids),
            metadata=dict(prompt_sample.metadata),
        )
        for j in range(group_size)
    ]


def save_samples(path: str | Path, samples: list[Sample]) -> None:
    """Write one JSON object per line (debug dumps of rollout batches)."""
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")


def load_samples(path: str | Path) -> list[Sample]:
    """Read a `save_samples` file; errors name the file and line."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Sample.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a saved Sample: {e}") from None
    return out
