"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Each prompt becomes one scheduler request; they all join the running batch. Streaming answers
are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from offload_rt.engine import GenerationResult, RequestError, SamplingParams
from offload_rt.server.guard import error_body
from offload_rt.server.schemas import ChatRequest, CommonRequest, CompletionRequest
from offload_rt.server.streams import Serving, merge, serving, submit_all, wait_results

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    s = serving(request)
    card = {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "offload_rt"}
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = serving(request)
    body.refuse_unsupported()
    tok = _tokenizer(s)
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    params = [_params(s, body, p, body.max_tokens or DEFAULT_COMPLETION_TOKENS) for p in prompts]
    streams = await submit_all(s.engine, prompts, params)
    meta = _meta("cmpl", "text_completion", s.model_name)
    if body.stream:
        chunks = _completion_chunks(streams, meta, [len(p) for p in prompts], body.include_usage)
        return _sse(chunks)
    results = await wait_results(streams, request)
    choices = [
        {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        for i, r in enumerate(results)
    ]
    return {**meta, "choices": choices, "usage": _usage(results)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    s = serving(request)
    body.refuse_unsupported()
    tok = _tokenizer(s)
    if s.chat is None:
        raise RequestError(f"model {s.model_name!r} has no chat template: use /v1/completions")
    text = s.chat.render([m.as_template_input() for m in body.messages])
    prompt = tok.encode(text, add_special_tokens=False)  # the template spells its own <s>
    limit = body.max_completion_tokens or body.max_tokens
    params = _params(s, body, prompt, limit or s.engine.scheduler.max_len - len(prompt))
    streams = await submit_all(s.engine, [prompt], [params])
    meta = _meta("chatcmpl", "chat.completion", s.model_name)
    if body.stream:
        meta["object"] = "chat.completion.chunk"
        return _sse(_chat_chunks(streams[0], meta, len(prompt), body.include_usage))
    (r,) = await wait_results(streams, request)
    message = {"role": "assistant", "content": r.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}
    return {**meta, "choices": [choice], "usage": _usage([r])}


def _tokenizer(s: Serving):
    tok = s.engine.model.tokenizer
    if tok is None:
        raise RequestError(
            f"model {s.model_name!r} has no tokenizer.json; send token ids to the native "
            "endpoint /v1/offload/generate instead"
        )
    return tok


def _params(s: Serving, body: CommonRequest, prompt: list[int], max_tokens: int) -> SamplingParams:
    room = s.engine.scheduler.max_len - len(prompt)
    if max_tokens < 1 or max_tokens > room:
        raise RequestError(
            f"max_tokens must be in [1, {room}] for this prompt of {len(prompt)} tokens "
            f"(the server holds {s.engine.scheduler.max_len} positions), got {max_tokens}"
        )
    return body.sampling(max_tokens)


def _meta(prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    return _counts(sum(r.prompt_tokens for r in results), sum(len(r.token_ids) for r in results))


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _completion_chunks(streams, meta, prompt_lens, include_usage):
    tokens = [0] * len(streams)
    async for i, e in merge(streams):
        if e.error is not None:
            yield {"error": error_body(e.error, 500)}
            return
        tokens[i] += len(e.token_ids)
        reason = e.result.finish_reason if e.result is not None else None
        if e.text or reason:
            choice = {"index": i, "text": e.text, "logprobs": None, "finish_reason": reason}
            yield {**meta, "choices": [choice]}
    if include_usage:
        yield {**meta, "choices": [], "usage": _counts(sum(prompt_lens), sum(tokens))}


async def _chat_chunks(stream, meta, prompt_len, include_usage):
    yield {**meta, "choices": [_delta({"role": "assistant", "content": ""}, None)]}
    tokens = 0
    async for e in stream:
        if e.error is not None:
            yield {"error": error_body(e.error, 500)}
            return
        tokens += len(e.token_ids)
        if e.text:
            yield {**meta, "choices": [_delta({"content": e.text}, None)]}
        if e.result is not None:
            yield {**meta, "choices": [_delta({}, e.result.finish_reason)]}
    if include_usage:
        yield {**meta, "choices": [], "usage": _counts(prompt_len, tokens)}


def _delta(delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def _counts(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
