"""The bridge between the event loop and the scheduler's thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from offload_rt.engine import OffloadModel, SamplingParams
from offload_rt.engine.scheduler import Event, Scheduler, SchedulerConfig


class ServingEngine:
    """One model, one scheduler; `stream` yields a request's events as they come."""

    def __init__(self, model: OffloadModel, config: SchedulerConfig) -> None:
        self.model = model
        decode = model.tokenizer.decode if model.tokenizer is not None else None
        self.scheduler = Scheduler(model.model, model.config.eos_token_ids, decode, config)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Submits at once (RequestError, QueueFull raise before the first event); closing the
        iterator early — a client gone — cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        req = self.scheduler.submit(prompt, params, deliver)
        return self._events(req, events)

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
