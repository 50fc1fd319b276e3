"""Generation routes of the HTTP server: OpenAI /v1/completions and /v1/chat/completions, native /generate.

Each route: parse, tokenize and check the request on the tokenizer thread (a 10 MB prompt
takes seconds to tokenize; the event loop goes on answering /health and streams meanwhile),
submit it to the EngineLoop, then stream or collect its events. A client that hangs up gets
its request aborted, streaming or not, so abandoned requests free their engine slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from miles_fsdp.engine.protocol import (
    ApiError, ChatRequest, CompletionRequest, GenerateRequest, IncrementalText, chat_choice, completion_choice,
    cut_at_stop, envelope, error_body, finish_reason, parse, usage,
)
from miles_fsdp.engine.sequence import Request, SamplingParams
from miles_fsdp.engine.server_loop import Pending

if TYPE_CHECKING:
    from miles_fsdp.engine.server import ServerLimits, ServerState

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never seen by the client


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- routes ------------------------------------------------------------------------------

async def completions(http: HTTPRequest):
    s: ServerState = http.app.state.server
    body, ids, request = await s.prepare(_completion_request, s, await http.body())
    p = s.engine_loop.submit(request)
    return await openai_reply(http, s, p, body, len(ids), chat=False, logprobs=body.logprobs is not None)


async def chat_completions(http: HTTPRequest):
    s: ServerState = http.app.state.server
    body, ids, request = await s.prepare(_chat_request, s, await http.body())
    p = s.engine_loop.submit(request)
    return await openai_reply(http, s, p, body, len(ids), chat=True, logprobs=body.logprobs)


async def generate(http: HTTPRequest):
    s: ServerState = http.app.state.server
    body, ids, request = await s.prepare(_generate_request, s, await http.body())
    p = s.engine_loop.submit(request)
    results = await until_disconnect(http, p, collect(s, p, "/generate"))
    if isinstance(results, Response):
        return results
    stops = body.sampling_params.stop_strings()
    return {"id": p.request.request_id, "prompt_ids": ids, "outputs": [
        {"index": r.sample_index, "token_ids": r.token_ids, "logprobs": r.logprobs.tolist(),
         "text": cut_at_stop(s.decode(r.token_ids), stops)[0],
         "finish_reason": finish_reason(r.finish_reason), "weight_version": r.weight_version,
         "seed": r.seed, "num_cached_prompt_tokens": r.num_cached_prompt_tokens,
         "timings": dataclasses.asdict(r.timings)} for r in results]}


# --- request preparation (tokenizer thread) ----------------------------------------------

def _completion_request(s: ServerState, raw: bytes):
    body = parse(CompletionRequest, raw)
    check_model(s.limits, body.model)
    ids = s.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
    return body, ids, make_request(s.limits, ids, "prompt", body.max_tokens, "max_tokens", body)


def _chat_request(s: ServerState, raw: bytes):
    body = parse(ChatRequest, raw)
    check_model(s.limits, body.model)
    ids = apply_chat_template(s.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    max_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return body, ids, make_request(s.limits, ids, "messages", body.max_new_tokens(), max_field, body)


def _generate_request(s: ServerState, raw: bytes):
    body = parse(GenerateRequest, raw)
    sp = body.sampling_params
    field = "input_ids" if body.input_ids is not None else "text"
    ids = body.input_ids if body.input_ids is not None else s.tokenizer.encode(body.text)
    return body, ids, make_request(s.limits, ids, field, sp.max_new_tokens, "sampling_params.max_new_tokens", sp)


def check_model(limits: ServerLimits, name: str | None) -> None:
    if name is not None and name != limits.model_name:
        raise ApiError(f"model {name!r} is not served here; use {limits.model_name!r} (see GET /v1/models)",
                       "model", 404, "not_found_error")


def make_request(limits: ServerLimits, ids: list[int], field: str, max_new: int | None, max_field: str,
                 sp) -> Request:
    """The engine Request, after the checks the engine would fail later. max_new None (the client
    set no limit): all the room the prompt leaves, at most limits.default_max_tokens if set."""
    if not ids:
        raise ApiError(f"{field} is empty; give at least one token", field)
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise ApiError(f"{field}: token id {bad} is outside the vocabulary [0, {limits.vocab_size})", field)
    if sp.n > limits.max_n:
        raise ApiError(f"n={sp.n} is larger than this server's limit of {limits.max_n}; lower n", "n")
    caps = [(cap, what) for cap, what in ((limits.max_model_len, "the model's maximum context"),
                                          (limits.kv_capacity_tokens, "the KV cache capacity")) if cap]
    if max_new is None:
        cap, what = min(caps)
        if len(ids) >= cap:
            raise ApiError(f"{field} has {len(ids)} tokens, which leaves no room for a completion within {what} "
                           f"of {cap} tokens; shorten the prompt", field)
        max_new = min(cap - len(ids), limits.default_max_tokens or cap)
    for cap, what in caps:
        if len(ids) + max_new > cap:
            param = field if len(ids) >= cap else max_field
            raise ApiError(f"{field} has {len(ids)} tokens and {max_field} is {max_new}: {len(ids) + max_new} "
                           f"exceeds {what} of {cap} tokens; shorten the prompt or lower {max_field}", param)
    try:
        params = SamplingParams(n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=max(sp.top_k, 0),
                                max_new_tokens=max_new, stop_token_ids=tuple(sp.stop_token_ids or ()),
                                stop_strings=tuple(sp.stop_strings()), seed=sp.seed)
    except ValueError as e:
        raise ApiError(str(e)) from None
    return Request(ids, params, request_id=new_id("req"))


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError("this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises for roles or orders a template refuses
        raise ApiError(f"messages: the chat template rejected them: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


# --- replies -----------------------------------------------------------------------------

async def until_disconnect(http: HTTPRequest, p: Pending, work: Awaitable):
    """`await work`, unless the client hangs up first: then cancel it (its `finally` aborts the
    engine request) and return a 499 nobody reads. Starlette cancels streaming responses on
    a disconnect by itself; a plain response would keep generating for no one."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)  # let its finally queue the abort
        log.info("client disconnected: aborted %s", p.request.request_id)
        return Response(status_code=CLIENT_GONE)
    return task.result()


async def _disconnected(http: HTTPRequest) -> None:
    # the body is read already: the next message is the disconnect (or the end of the response)
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(s: ServerState, p: Pending, endpoint: str) -> list:
    n, results = p.request.params.n, [None] * p.request.params.n
    done = 0
    try:
        while done < n:
            event = await p.events.get()
            if event[0] == "done":
                results[event[1]] = event[2]
                done += 1
            elif event[0] == "error":
                status = event[2] if len(event) > 2 else 500
                raise ApiError(event[1], status=status, type="invalid_request_error" if status < 500 else "server_error")
    finally:
        if done < n:  # cancelled (client gone) or failed: free the engine's slots
            s.engine_loop.abort(p)
        s.metrics.latency.labels(endpoint).observe(time.perf_counter() - p.submitted)
    return results


async def stream(s: ServerState, p: Pending, endpoint: str, chunk, logprobs: bool, head=(), tail=None):
    """SSE: chunk(index, text, finish, tokens, logprobs) -> dict; tail(completion_tokens) -> dict."""
    n, stops = p.request.params.n, list(p.request.params.stop_strings)
    texts = [IncrementalText(s.decode, stops) for _ in range(n)]
    done = generated = 0
    try:
        for c in head:
            yield _sse(c)
        while done < n:
            event = await p.events.get()
            if event[0] == "tokens":
                _, i, ids, lps = event
                generated += len(ids)
                text = texts[i].push(ids)
                if text or logprobs:
                    yield _sse(chunk(i, text, None, [s.decode([t]) for t in ids] if logprobs else None, lps))
            elif event[0] == "done":
                _, i, result = event
                done += 1
                yield _sse(chunk(i, texts[i].finish(), finish_reason(result.finish_reason), None, None))
            else:
                msg = event[1] if event[0] == "error" else "sample restarted by a weight update; retry"
                yield _sse(error_body(msg, "server_error"))
                break
        if done == n and tail is not None:
            yield _sse(tail(generated))
        yield "data: [DONE]\n\n"
    finally:
        if done < n:
            s.engine_loop.abort(p)
        s.metrics.latency.labels(endpoint).observe(time.perf_counter() - p.submitted)


async def openai_reply(http: HTTPRequest, s: ServerState, p: Pending, body, prompt_len: int, chat: bool,
                       logprobs: bool):
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    rid, model = new_id("chatcmpl" if chat else "cmpl"), s.limits.model_name
    kind = "chat.completion" if chat else "text_completion"

    def choice(i, text, finish, tokens, lps, delta=False):
        if chat:
            return chat_choice(i, text, finish, tokens, lps, delta)
        return completion_choice(i, text, finish, tokens, lps)

    if body.stream:
        kind += ".chunk" if chat else ""
        chunk = lambda *a: envelope(kind, rid, model, [choice(*a, delta=True)])  # noqa: E731
        head = [chunk(i, None, None, None, None) for i in range(body.n)] if chat else ()  # role first
        tail = None
        if (body.stream_options or {}).get("include_usage"):
            tail = lambda k: envelope(kind, rid, model, [], usage(prompt_len, k))  # noqa: E731
        return StreamingResponse(stream(s, p, endpoint, chunk, logprobs, head, tail), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    results = await until_disconnect(http, p, collect(s, p, endpoint))
    if isinstance(results, Response):
        return results
    stops = body.stop_strings()
    choices = [choice(r.sample_index, cut_at_stop(s.decode(r.token_ids), stops)[0], finish_reason(r.finish_reason),
                      [s.decode([t]) for t in r.token_ids] if logprobs else None, r.logprobs.tolist())
               for r in results]
    return envelope(kind, rid, model, choices, usage(prompt_len, sum(len(r.token_ids) for r in results)))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
