"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Each choice (n of them per prompt) becomes one scheduler request; they all join the running
batch, and the n choices of a prompt that join together share its prefill. Streaming answers
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
from offload_rt.engine.tokenizer import TextTokenizer
from offload_rt.server.choices import ChatChoice, CompletionChoice
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
    given = body.prompts()
    prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in given]
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    choices, params = [], []
    for p, text in zip(prompts, given):
        echo = (text if isinstance(text, str) else tok.decode(p)) if body.echo else None
        for j in range(body.n):
            choices.append(CompletionChoice(len(choices), tok, p, echo, body.logprobs is not None))
            params.append(_params(s, body, p, max_tokens, j, body.prompt_logprobs()))
    streams = await submit_all(s.engine, [c.prompt for c in choices], params)
    meta = _meta("cmpl", "text_completion", s.model_name)
    prompt_tokens = sum(len(p) for p in prompts)
    if body.stream:
        want_lps = body.logprobs is not None
        return _sse(_completion_chunks(streams, choices, meta, prompt_tokens, body, want_lps))
    results = await wait_results(streams, request)
    finals = [c.final(r) for c, r in zip(choices, results)]
    return {**meta, "choices": finals, "usage": _usage(prompt_tokens, results)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    s = serving(request)
    body.refuse_unsupported()
    tok = _tokenizer(s)
    if s.chat is None:
        raise RequestError(f"model {s.model_name!r} has no chat template: use /v1/completions")
    text = s.chat.render([m.as_template_input() for m in body.messages])
    prompt = tok.encode(text, add_special_tokens=False)  # the template spells its own <s>
    limit = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), None)
    limit = s.engine.scheduler.max_len - len(prompt) if limit is None else limit
    params = [_params(s, body, prompt, limit, j, None) for j in range(body.n)]
    choices = [ChatChoice(j, tok, body.logprobs) for j in range(body.n)]
    streams = await submit_all(s.engine, [prompt] * body.n, params)
    meta = _meta("chatcmpl", "chat.completion", s.model_name)
    if body.stream:
        meta["object"] = "chat.completion.chunk"
        return _sse(_chat_chunks(streams, choices, meta, len(prompt), body.include_usage))
    results = await wait_results(streams, request)
    finals = [c.final(r) for c, r in zip(choices, results)]
    return {**meta, "choices": finals, "usage": _usage(len(prompt), results)}


def _tokenizer(s: Serving) -> TextTokenizer:
    tok = s.engine.model.tokenizer
    if tok is None:
        raise RequestError(
            f"model {s.model_name!r} has no tokenizer.json; send token ids to the native "
            "endpoint /v1/offload/generate instead"
        )
    return tok


def _params(
    s: Serving,
    body: CommonRequest,
    prompt: list[int],
    max_tokens: int,
    choice: int,
    prompt_logprobs: int | None,
) -> SamplingParams:
    room = s.engine.scheduler.max_len - len(prompt)
    least = 0 if body.echoes() else 1  # an echoed prompt may be all that is asked for
    if not least <= max_tokens <= room:
        raise RequestError(
            f"max_tokens must be in [{least}, {room}] for this prompt of {len(prompt)} tokens "
            f"(the server holds {s.engine.scheduler.max_len} positions), got {max_tokens}"
        )
    return body.sampling(max_tokens, choice, body.token_logprobs(), prompt_logprobs)


def _meta(prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def _usage(prompt_tokens: int, results: list[GenerationResult]) -> dict[str, int]:
    """A prompt counts once, however many choices it has (as OpenAI counts)."""
    return _counts(prompt_tokens, sum(len(r.token_ids) for r in results))


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _completion_chunks(streams, choices, meta, prompt_tokens, body, want_lps):
    tokens = 0
    async for i, e in merge(streams):
        if e.error is not None:
            yield {"error": error_body(e.error, 500)}
            return
        tokens += len(e.token_ids)
        for entry in choices[i].chunks(e, want_lps):
            yield {**meta, "choices": [entry]}
    if body.include_usage:
        yield {**meta, "choices": [], "usage": _counts(prompt_tokens, tokens)}


async def _chat_chunks(streams, choices, meta, prompt_tokens, include_usage):
    for c in choices:
        yield {**meta, "choices": [c.first()]}
    tokens = 0
    async for i, e in merge(streams):
        if e.error is not None:
            yield {"error": error_body(e.error, 500)}
            return
        tokens += len(e.token_ids)
        for entry in choices[i].chunks(e):
            yield {**meta, "choices": [entry]}
    if include_usage:
        yield {**meta, "choices": [], "usage": _counts(prompt_tokens, tokens)}


def _counts(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
