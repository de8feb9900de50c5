"""Requests in flight: what the routes share to submit prompts and follow their events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi import Request

from offload_rt.engine import GenerationResult, SamplingParams
from offload_rt.engine.scheduler import Event
from offload_rt.server.chat import ChatTemplate
from offload_rt.server.engine import ServingEngine

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


class ServerSideError(RuntimeError):
    """The model failed while serving a request (a dead actor past its retries...): a 500."""


class ClientGone(Exception):
    """The client of a non-streaming request closed its connection; its requests are gone."""


@dataclass(frozen=True)
class Serving:
    engine: ServingEngine
    model_name: str
    chat: ChatTemplate | None
    created: int  # when the server started, for /v1/models


def serving(request: Request) -> Serving:
    return request.app.state.serving


async def submit_all(
    engine: ServingEngine, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
) -> list[AsyncIterator[Event]]:
    """One API call's requests, queued together: all or none."""
    return await engine.stream_together(prompts, params)


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Events of all streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for e in streams[0]:
            yield 0, e
        return
    out: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(i: int, st: AsyncIterator[Event]) -> None:
        async for e in st:
            await out.put((i, e))
        await out.put(None)

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await out.get()) is not None:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def wait_results(
    streams: list[AsyncIterator[Event]], request: Request
) -> list[GenerationResult]:
    """Every stream's result; a client that goes away cancels them all."""

    async def collect() -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(streams)
        async for i, e in merge(streams):
            if e.error is not None:
                raise ServerSideError(e.error)
            if e.result is not None:
                results[i] = e.result
        return results  # type: ignore[return-value]

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone()
