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
        self.scheduler = Scheduler(model.model, model.config.eos_token_ids, decode, config)

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Submits at once (RequestError, QueueFull raise before the first event); closing the
        iterator early — a client gone — cancels the request."""
        return (await self.stream_together([prompt], [params]))[0]

    async def stream_together(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> list[AsyncIterator[Event]]:
        """`stream` for the prompts and choices of one API call, submitted together so that
        they join the batch at one step boundary (and share their prefill): all or none."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in prompts]

        def deliver_to(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)

        items = [(p, sp, deliver_to(q)) for p, sp, q in zip(prompts, params, queues)]
        reqs = self.scheduler.submit_together(items)
        return [self._events(req, q) for req, q in zip(reqs, queues)]

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
