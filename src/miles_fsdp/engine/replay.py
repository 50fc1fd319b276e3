"""ReplaySource: the rollout interface (engine/source.py) over samples a rollout-only run saved.

A rollout-only run saves every sample it generated, per step and rank, to
`step_XXXXX_rankR.jsonl` (data/sample.py `save_samples`), each with its request seed. Replay
answers a request with the saved samples of the same (seed, prompt): the train-only run
regenerates the same requests (seeds are a function of run seed, step, rank and prompt), so
the loop, its rewards and filters run exactly as they did, with no engine and no GPU memory
for one. update_weights, release and resume do nothing: the samples are fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from miles_fsdp.data.sample import Sample, Status, load_samples
from miles_fsdp.engine.sequence import FinishReason, Request, Result, SamplingParams, Timings
from miles_fsdp.errors import UserError

_FINISH = {Status.COMPLETED: FinishReason.STOP, Status.TRUNCATED: FinishReason.LENGTH,
           Status.ABORTED: FinishReason.ABORT}


class ReplayError(UserError, ValueError):
    """A request the saved rollouts cannot answer."""


class ReplaySource:
    def __init__(self, rollout_dir: str | Path, rank: int = 0):
        self.dir = Path(rollout_dir)
        files = sorted(self.dir.glob(f"step_*_rank{rank}.jsonl"))
        if not files:
            raise ReplayError(f"{self.dir}: no step_*_rank{rank}.jsonl files to replay; run with "
                              "--debug-mode rollout_only first (same data, seed and number of processes)")
        self._groups: dict[tuple[int, tuple[int, ...]], list[Sample]] = {}
        for f in files:
            for s in load_samples(f):
                if s.seed is None:
                    raise ReplayError(f"{f}: sample {s.index} has no seed (saved by an older version?); "
                                      "rerun the rollout-only run")
                self._groups.setdefault((s.seed, tuple(s.prompt_ids)), []).append(s)

    def generate(self, requests: list[Request], stop: Callable[[], bool] | None = None) -> list[list[Result]]:
        return [self._replay(req) for req in requests]

    async def agenerate(self, prompt_ids: list[int], params: SamplingParams,
                        stop: Callable[[], bool] | None = None) -> Result:
        raise ReplayError("train-only replay does not cover generate hooks (their turns are not saved); "
                          "run without rollout.generate_fn or without debug_mode=train_only")

    def _replay(self, req: Request) -> list[Result]:
        group = self._groups.get((req.params.seed, tuple(req.prompt_ids)))
        if group is None or len(group) < req.params.n:
            raise ReplayError(f"{self.dir}: no saved samples for request seed {req.params.seed} (prompt of "
                              f"{len(req.prompt_ids)} tokens); replay with the rollout-only run's data, seed, "
                              "steps and number of processes")
        return [Result(request_id=req.request_id, sample_index=j, token_ids=list(s.response_ids),
                       logprobs=torch.tensor(s.response_logprobs, dtype=torch.float32),
                       finish_reason=_FINISH[s.status], timings=Timings(), weight_version=s.weight_version or 0,
                       seed=s.seed) for j, s in enumerate(sorted(group, key=lambda s: s.index)[: req.params.n])]

    def update_weights(self, weights, version: int) -> None:
        """Nothing to update: the saved samples are what they are."""

    def release(self) -> None:
        """Nothing to release."""

    def resume(self) -> None:
        """Nothing to resume."""

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Nothing to close."""
