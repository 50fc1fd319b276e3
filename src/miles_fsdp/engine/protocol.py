"""Request and response schemas of the HTTP server (`miles-fsdp serve`).

Requests are pydantic models parsed strictly from the raw body (`parse`), so a wrong type
is an error, not a silent coercion, and every error names the offending field. Responses
are plain dicts in the OpenAI wire format (completions, chat completions, SSE chunks) or
in the native `/generate` format:

    POST /generate {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8, "n": 2}}
    -> {"id": "req-..", "prompt_ids": [1, 2, 3],
        "outputs": [{"index": 0, "token_ids": [..], "logprobs": [..], "text": "..", "finish_reason": "length",
                     "weight_version": 4, "seed": .., "num_cached_prompt_tokens": 0, "timings": {..}}, ..]}
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered with `status` and the OpenAI error body; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param)


def error_body(message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param}}


class _Strict(BaseModel):
    # strict: "5" is not an int; forbid: a misspelt option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


def _no_effect(value, neutral, name: str) -> None:
    if value is not None and value != neutral:
        raise ApiError(f"{name} is not supported by this server; leave it unset (or {neutral!r})", param=name)


def _check_stop(stop, param: str = "stop") -> None:
    if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
        raise ApiError(f"{param}: stop strings must be non-empty", param=param)


class _SamplingFields(_Strict):
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="extension; -1 or 0 disables top-k")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def check(self) -> None:
        _check_stop(self.stop)
        _no_effect(self.presence_penalty, 0.0, "presence_penalty")
        _no_effect(self.frequency_penalty, 0.0, "frequency_penalty")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise ApiError("stream_options: only 'include_usage' is supported", param="stream_options")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    model: str | None = None
    prompt: str | list[int]
    max_tokens: int | None = Field(None, ge=1, description="unset: all the context leaves after the prompt")
    logprobs: int | None = Field(None, ge=0, le=0, description="only the sampled token's logprob is kept")
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        _no_effect(self.echo, False, "echo")
        _no_effect(self.suffix, None, "suffix")
        _no_effect(self.logit_bias or None, None, "logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError("best_of is not supported; use n", param="best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only the sampled token's logprob is kept")

    def max_new_tokens(self) -> int | None:
        """None when the client set no limit (the server then fills the context)."""
        return self.max_completion_tokens or self.max_tokens


class NativeSamplingParams(_Strict):
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)

    def stop_strings(self) -> list[str]:
        return _SamplingFields.stop_strings(self)  # same field, same meaning

    def check(self) -> None:
        _check_stop(self.stop, "sampling_params.stop")


class GenerateRequest(_Strict):
    input_ids: list[int] | None = None
    text: str | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)

    def check(self) -> None:
        if (self.input_ids is None) == (self.text is None):
            raise ApiError("give exactly one of 'input_ids' (token ids) or 'text'", param="input_ids")
        self.sampling_params.check()


class UpdateWeightsRequest(_Strict):
    path: str = Field(description="directory holding HF *.safetensors for this model")
    version: int = Field(ge=0)


def parse(model: type[BaseModel], raw: bytes):
    """Parse a JSON body into `model`, turning the first validation error into a ApiError."""
    if not raw.strip():
        raise ApiError("request body is empty; send a JSON object", param=None)
    try:
        obj = model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(f"request body is not valid JSON: {err['msg']}") from None
        # unions add the member type to loc ("prompt", "str"); keep the field path only
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in _TYPE_TAGS)]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        field = loc[-1] if loc and not loc[-1].isdigit() else (loc[0] if loc else "")
        if not loc and err["type"] == "model_type":
            msg = "request body must be a JSON object"
        elif err["type"] == "extra_forbidden":
            hint = f" (did you mean '{_RENAMED[field]}'?)" if field in _RENAMED else ""
            msg = f"unknown field '{param}'{hint}; remove it or fix its name"
        elif err["type"] == "missing":
            msg = f"field '{param}' is required"
        elif err["type"].endswith("_type") and any(p in _EXPECT for p in loc):
            i = next(i for i, p in enumerate(loc) if p in _EXPECT)
            param = ".".join(loc[: i + 1])
            msg = f"{param}: expected {_EXPECT[loc[i]]}"
        else:
            msg = f"{param}: {msg}" if param else msg
        raise ApiError(msg, param=param) from None
    if hasattr(obj, "check"):
        obj.check()
    return obj


# union fields report one error per member; say what the whole field accepts instead
_TYPE_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[TextPart]", "dict", "none"}
_EXPECT = {
    "prompt": "a string or a list of token ids (ints)",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}
_RENAMED = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_tokens", "stop_strings": "stop"}


def finish_reason(value) -> str:
    """Engine finish reason (enum or str) -> OpenAI's: 'stop', 'length' or 'abort'."""
    name = str(getattr(value, "value", value)).lower()
    return "length" if name in ("length", "max_tokens", "max_new_tokens") else name


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish: str | None, tokens=None, logprobs=None) -> dict:
    lp = None
    if tokens is not None:
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}


def chat_choice(index: int, text: str | None, finish: str | None, tokens=None, logprobs=None,
                delta: bool = False) -> dict:
    lp = None
    if tokens is not None:
        lp = {"content": [{"token": t, "logprob": p, "bytes": list(t.encode()), "top_logprobs": []}
                          for t, p in zip(tokens, logprobs)]}
    key = "delta" if delta else "message"
    msg = {"role": "assistant", "content": text} if not delta or text is None else {"content": text}
    if delta and text is None:
        msg = {"role": "assistant", "content": ""}
    return {"index": index, key: msg, "logprobs": lp, "finish_reason": finish}


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """kind: 'text_completion', 'chat.completion' or 'chat.completion.chunk'."""
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (OpenAI leaves the stop string out), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class IncrementalText:
    """A sample's completion text, released piece by piece while streaming.

    Holds back what may still change: the last len(longest stop) - 1 characters (a stop
    string may be forming) and trailing U+FFFD (a UTF-8 character split across tokens).
    """

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids += ids
        text, self.stopped = cut_at_stop(self.decode(self.ids), self.stops)
        if self.stopped:
            return self._emit(text)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._emit(text[:end])

    def finish(self) -> str:
        return "" if self.stopped else self._emit(cut_at_stop(self.decode(self.ids), self.stops)[0])

    def _emit(self, text: str) -> str:
        out = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return out
