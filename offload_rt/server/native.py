"""The native endpoint: msgpack in, msgpack frames out (see offload_rt/protocol.py).

Token ids and text pieces stream as they come; the Python client reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from offload_rt import protocol
from offload_rt.engine import GenerationResult, RequestError, SamplingParams
from offload_rt.engine.logprobs import TokenLogprob
from offload_rt.engine.scheduler import Event, QueueFull
from offload_rt.server.streams import ClientGone, ServerSideError, serving, wait_results

router = APIRouter()


@router.post(protocol.PATH)
async def generate(request: Request) -> Response:
    try:
        req = protocol.decode_request(await request.body())
        s = serving(request)
        prompt = _prompt(s.engine.model, req.pop("prompt"))
        stream = bool(req.pop("stream", False))
        params = SamplingParams.with_stop(req.pop("stop", None), **req)
        if params.max_new_tokens > s.engine.scheduler.max_len:  # clipped to the room left,
            # as locally, unless past anything this server could ever produce
            raise RequestError(
                f"max_new_tokens must be at most {s.engine.scheduler.max_len} (this server's "
                f"positions per request), got {params.max_new_tokens}"
            )
        events = await s.engine.stream(prompt, params)
    except (protocol.ProtocolError, RequestError) as e:
        return error_response(400, str(e))
    except QueueFull as e:
        return error_response(429, str(e))
    if stream:
        return StreamingResponse(_frames(events), media_type=protocol.CONTENT_TYPE)
    try:
        (result,) = await wait_results([events], request)
    except ServerSideError as e:
        return error_response(500, str(e))
    except ClientGone:
        return Response(status_code=499)
    return Response(protocol.pack(_done(result)), media_type=protocol.CONTENT_TYPE)


def _prompt(model, prompt: str | list) -> list[int]:
    if isinstance(prompt, list) and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        raise RequestError("prompt must be a string or a list of integer token ids")
    return model.encode(prompt)


async def _frames(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    async for e in events:
        if e.error is not None:
            yield protocol.pack({"type": "error", "status": 500, "message": e.error})
        elif e.result is not None:
            if e.token_ids or e.text:
                yield protocol.pack(_token(e))
            yield protocol.pack(_done(e.result))
        else:
            yield protocol.pack(_token(e))


def _token(e: Event) -> dict:
    return {
        "type": "token",
        "token_ids": e.token_ids,
        "text": e.text,
        "logprobs": _wire(e.logprobs),
    }


def _done(r: GenerationResult) -> dict:
    return {
        "type": "done",
        "token_ids": r.token_ids,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "logprobs": _wire(r.logprobs),
        "prompt_logprobs": _wire(r.prompt_logprobs),
    }


def _wire(entries: list[TokenLogprob] | None) -> list | None:
    if entries is None:
        return None
    return [[e.token, e.logprob, [list(pair) for pair in e.top]] for e in entries]


def error_response(status: int, message: str) -> Response:
    frame = protocol.pack({"type": "error", "status": status, "message": message})
    return Response(frame, status_code=status, media_type=protocol.CONTENT_TYPE)
