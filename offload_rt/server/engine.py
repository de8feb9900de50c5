"""The bridge between the event loop and the scheduler's thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from offload_rt.engine import OffloadModel, SamplingParams
from offload_rt.engine.scheduler import Event, Scheduler, SchedulerConfig


class ServingEngine:
    """One model, one scheduler; `stream` yields a request's events as they come."""

    def __init__(self, model: OffloadModel, config: SchedulerConfig) -> None:
        self.model = model
        decode = model.tokenizer.decode if model.tokenizer is not None else None
        eos = model.config.eos_token_ids
        self.scheduler = Scheduler(model.model, eos, decode, config, model.grammars)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Submits at once (RequestError, QueueFull raise before the first event); closing the
        iterator early — a client gone — cancels the request."""
        return (await self.stream_together([prompt], [params]))[0]

    async def stream_together(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> list[AsyncIterator[Event]]:
        """`stream` for the prompts and choices of one API call, submitted together so that
        they join the batch at one step boundary (and share their prefill): all or none."""
        await self.compile_schemas(params)
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in prompts]

        def deliver_to(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)

        items = [(p, sp, deliver_to(q)) for p, sp, q in zip(prompts, params, queues)]
        reqs = self.scheduler.submit_together(items)
        return [self._events(req, q) for req, q in zip(reqs, queues)]

    async def compile_schemas(self, params: Sequence[SamplingParams]) -> None:
        """Compile the requests' JSON schemas (each once; later requests find it cached) in a
        worker thread, so neither the event loop nor the scheduler waits on a large one; a
        schema the library cannot compile raises RequestError here."""
        grammars = self.model.grammars
        schemas = {p.json_schema for p in params if p.json_schema is not None}
        if grammars is None or not schemas:
            return  # without a tokenizer, the scheduler refuses json_schema by name
        for schema in schemas:
            await asyncio.to_thread(grammars.compile, schema)

    @staticmethod
    async def _events(req, events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        try:
            while True:
                event = await events.get()
                yield event
                if event.result is not None or event.error is not None:
                    return
        finally:
            req.cancel()  # a no-op once the request is done

    def close(self) -> None:
        self.scheduler.close()
