"""The records that flow through the engine: Request in, Sequence inside, Result out.

One `Request` with `n` samples becomes `n` `Sequence`s (one per sample). A Sequence is all
the scheduler, block manager and runner exchange: its token ids, its page table, how many
of its tokens already have KV in the cache, and its sampling parameters.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token id or stop string was produced (it is kept in token_ids)
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # engine.abort(request_id); token_ids hold what was generated so far


class SeqStatus(enum.Enum):
    WAITING = enum.auto()  # queued (new or preempted); holds no pages
    RUNNING = enum.auto()  # holds pages; prefilling (maybe in chunks) or decoding
    FINISHED = enum.auto()


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction."""

    n: int = 1
    """Number of independent samples of the prompt (they share the prompt's KV pages)."""
    temperature: float = 1.0
    """0 means greedy argmax. Logprobs are always of the distribution sampled from:
    log_softmax(masked logits / temperature); at temperature 0 they use temperature 1."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 disables."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids; the engine's eos ids are added unless ignore_eos."""
    stop_strings: tuple[str, ...] = ()
    """Stop when the decoded completion contains one (needs a tokenizer or detokenize fn)."""
    ignore_eos: bool = False
    seed: int | None = None
    """Sampling seed; None draws one (reported in Result.seed so the sample can be replayed)."""

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {want}")

        if self.n < 1:
            bad("n", "an integer >= 1")
        if self.temperature < 0:
            bad("temperature", ">= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a value in (0, 1]")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 = disabled)")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            bad("seed", "None or an integer in [0, 2**32)")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        if any(not s for s in self.stop_strings):
            bad("stop_strings", "non-empty strings")


_request_counter = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    """Unique among unfinished requests; empty means the engine assigns one."""

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if not self.prompt_ids:
            raise ValueError(f"Request {self.request_id!r}: prompt_ids is empty; give at least one token id")
        if not self.request_id:
            self.request_id = f"req-{next(_request_counter)}"


@dataclass
class Timings:
    """Seconds, per sample. queue: arrival -> first scheduled; prefill: first scheduled ->
    first token; decode: first token -> finish; ttft: arrival -> first token."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0


@dataclass
class Result:
    request_id: str
    sample_index: int
    token_ids: list[int]
    """Completion only (the prompt is not repeated); a stop token is included."""
    logprobs: torch.Tensor
    """fp32 [len(token_ids)] on CPU: log-prob of each token under the distribution it was
    sampled from (mk.logprobs of the masked, temperature-scaled logits)."""
    finish_reason: FinishReason
    timings: Timings
    weight_version: int
    """Version of the weights that produced every token (updates never mix versions)."""
    seed: int
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache at first admission."""


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one sample: the tokens appended this step, for streaming."""

    request_id: str
    sample_index: int
    new_token_ids: list[int]
    new_logprobs: list[float]
    result: Result | None = None
    """Set when the sample finished this step."""
    reset: bool = False
    """The sample was restarted from its prompt (weight update with policy 'restart'):
    drop what was streamed for it before; new_token_ids is empty."""

    @property
    def finished(self) -> bool:
        return self.result is not None


class Sequence:
    """One sample of a request, as the engine tracks it."""

    _ids = itertools.count()

    def __init__(self, req: Request, sample_index: int, seed: int, now: float, leader: Sequence | None = None):
        self.seq_id = next(Sequence._ids)
        self.request_id = req.request_id
        self.sample_index = sample_index
        self.params = req.params
        self.seed = seed
        self.prompt_len = len(req.prompt_ids)
        self.token_ids: list[int] = list(req.prompt_ids)  # prompt + completion
        self.logprobs: list[float] = []
        self.block_table: list[int] = []  # page ids, position p lives in block_table[p // S]
        self.page_hashes: list[int] = []  # chained hashes of the full pages registered so far
        self.num_computed = 0  # tokens whose KV is in the cache
        self.draft: list[int] = []  # speculative tokens for positions num_tokens, num_tokens + 1, ...
        self.draft_computed = 0  # positions whose draft-KV entry is teacher-forced (speculative.py)
        self.num_cached_prompt_tokens = 0
        self.status = SeqStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.leader = leader  # n > 1: wait for sample 0 to prefill the prompt, then hit its pages
        self.stop_ids: frozenset[int] = frozenset()
        self.weight_version = 0
        self.t_arrival = now
        self.t_scheduled: float | None = None
        self.t_first_token: float | None = None
        self.t_finish: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def reset_completion(self) -> None:
        """Forget generated tokens (restart from the prompt); pages must already be freed."""
        del self.token_ids[self.prompt_len :]
        self.logprobs.clear()
        self.t_first_token = None

    def to_result(self) -> Result:
        t_sched = self.t_scheduled if self.t_scheduled is not None else self.t_arrival
        t_first = self.t_first_token if self.t_first_token is not None else self.t_finish
        timings = Timings(
            queue_s=t_sched - self.t_arrival,
            prefill_s=max(0.0, t_first - t_sched),
            decode_s=max(0.0, self.t_finish - t_first),
            ttft_s=max(0.0, t_first - self.t_arrival),
        )
        return Result(
            request_id=self.request_id,
            sample_index=self.sample_index,
            token_ids=self.completion_ids,
            logprobs=torch.tensor(self.logprobs, dtype=torch.float32),
            finish_reason=self.finish_reason,
            timings=timings,
            weight_version=self.weight_version,
            seed=self.seed,
            num_cached_prompt_tokens=self.num_cached_prompt_tokens,
        )
