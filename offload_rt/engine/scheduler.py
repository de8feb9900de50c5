"""Continuous batching: requests join the running batch at step boundaries and leave when done.

One thread owns the model. Each running request holds one row of a KV cache of `max_batch`
rows. Requests that arrive together are prefilled together into free rows (each row keeps its
own positions, so its keys and values are those of its solo run); then every step decodes one
token for all running rows together, each with its own sampling parameters and stopping rules.
A finished or cancelled request frees its row at the next step boundary; waiting requests take
free rows in arrival order; when `max_queue` requests already wait, `submit` refuses with
`QueueFull`.

Events reach each request's `on_event` callback on the scheduler's thread: one per new token
(its id and the text that is safe to send), the last one carrying the result or an error.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from offload_rt.engine.generate import BatchDecoder
from offload_rt.engine.grammar import Grammars
from offload_rt.engine.logprobs import TokenLogprob
from offload_rt.engine.rows import (
    GenerationResult,
    SequenceState,
    check_finished,
    check_request,
    new_state,
    sample_rows,
    to_result,
)
from offload_rt.engine.sampling import SamplingParams
from offload_rt.engine.textstream import TextStream
from offload_rt.model import DecoderModel

log = logging.getLogger(__name__)

Decode = Callable[[list[int]], str]
Listener = Callable[["Event"], None]  # a request's events, on the scheduler's thread


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # requests decoded together; each holds one KV-cache row
    max_len: int | None = None  # KV positions per row (prompt + new tokens); None: the context
    max_queue: int = 64  # requests waiting for a row; one more is refused (HTTP 429)
    prefill_tokens: int = 4096  # most padded prompt tokens prefilled together in one forward

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {v!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ValueError(f"SchedulerConfig.max_len must be an integer >= 2, got {self.max_len}")


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is full: try again later."""


@dataclass
class Event:
    token_ids: list[int]  # the tokens this event adds (one per step; none in the last event)
    text: str  # the text that is safe to send now ("" without a tokenizer)
    result: GenerationResult | None = None  # set on the last event of a completed request
    error: str | None = None  # set on the last event of a request that failed on the server
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first event, when asked


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    budget: int  # most new tokens: max_new_tokens, cut to what the row can hold
    state: SequenceState
    on_event: Callable[[Event], None]
    stream: TextStream | None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Drop the request at the next step boundary (a client went away); no more events."""
        self.cancelled.set()


@dataclass
class SchedulerStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    refused: int = 0
    generated_tokens: int = 0
    steps: int = 0  # batched decode steps
    step_rows: int = 0  # running requests summed over steps (/ steps: the mean batch)


class Scheduler:
    def __init__(
        self,
        model: DecoderModel,
        eos_ids: tuple[int, ...],
        decode: Decode | None,
        config: SchedulerConfig | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.decode = decode
        self.grammars = grammars  # compiles requests' JSON schemas; None: no tokenizer
        self.config = config or SchedulerConfig()
        context = model.config.max_position_embeddings
        self.max_len = min(self.config.max_len or context, context)
        self.decoder = BatchDecoder.empty(model, self.config.max_batch, self.max_len)
        self.rows: list[Request | None] = [None] * self.config.max_batch
        self.waiting: deque[Request] = deque()
        self.stats = SchedulerStats()
        self._token_times: deque[float] = deque(maxlen=8192)  # when recent tokens came out
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="offload-rt-scheduler", daemon=True)
        self._thread.start()

    # ---- called from any thread ----

    def submit(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> Request:
        """Queue a request; raises RequestError for a prompt that cannot be served and
        QueueFull when the queue is full. Events then arrive on the scheduler's thread."""
        return self.submit_together([(prompt, params, on_event)])[0]

    def submit_together(
        self, items: list[tuple[list[int], SamplingParams, Listener]]
    ) -> list[Request]:
        """Queue requests at one step boundary (the prompts and n choices of one API call):
        free rows permitting, they are prefilled in one forward, a prompt given several times
        once. All or none: a RequestError or QueueFull for one queues none."""
        for prompt, params, _ in items:
            check_request(prompt, params, self.max_len, self.model.config.vocab_size)
        reqs = [self._request(*item) for item in items]
        queued = [r for r in reqs if r.budget > 0 or r.state.params.prompt_logprobs is not None]
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            free = sum(r is None for r in self.rows)
            if queued and len(self.waiting) + len(queued) - free > self.config.max_queue:
                self.stats.refused += len(queued)
                raise QueueFull(
                    f"{self.config.max_batch} requests are running and {len(self.waiting)} "
                    "are waiting, the most this server queues: try again later"
                )
            self.stats.submitted += len(queued)
            self.waiting.extend(queued)
            self._cond.notify()
        for r in reqs:
            if r not in queued:  # nothing to generate or score: answered without the model
                r.on_event(Event([], "", result=to_result(r.state, self.decode)))
        return reqs

    def _request(self, prompt: list[int], params: SamplingParams, on_event: Listener) -> Request:
        state = new_state(prompt, params, self.eos_ids, self.grammars)
        stream = TextStream(self.decode, params.stop_strings) if self.decode else None
        budget = min(params.max_new_tokens, self.max_len - len(prompt))
        return Request(next(self._ids), list(prompt), budget, state, on_event, stream)

    def queue_depth(self) -> int:
        return len(self.waiting)

    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated over the last `window` seconds, per second, all requests together."""
        since = time.monotonic() - window
        return sum(t > since for t in list(self._token_times)) / window

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current step; waiting and running requests end with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the scheduler's thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self.waiting and self.running() == 0:
                    self._cond.wait()
                if self._closing:
                    break
                admitted = self._admit()
            for group in _prefill_groups(admitted, self.config.prefill_tokens):
                self._guard([row for row, _ in group], self._prefill, group)
            self._drop_cancelled()
            if self.running():
                self._guard(self._occupied(), self._step)
        self._fail_all("the server is shutting down")

    def _admit(self) -> list[tuple[int, Request]]:
        admitted = []
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled.is_set():
                self.waiting.popleft()
                self.stats.cancelled += 1
                continue
            free = next((i for i, r in enumerate(self.rows) if r is None), None)
            if free is None:
                break
            self.waiting.popleft()
            self.rows[free] = req
            admitted.append((free, req))
        return admitted

    def _occupied(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]

    def _guard(self, rows: list[int], fn: Callable[..., None], *args: object) -> None:
        """Run a model call; when it fails (a dead actor past its retries, out of memory),
        the requests it served end with the error and the scheduler goes on with the rest."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure ends these requests, not the server
            log.exception("model step failed")
            for i in rows:
                req = self.rows[i]
                if req is not None:
                    self.rows[i] = None
                    self.stats.failed += 1
                    self._emit(req, Event([], "", error=f"{type(e).__name__}: {e}"))

    def _prefill(self, group: list[tuple[int, Request]]) -> None:
        rows = [row for row, _ in group]
        score = [req.state.params.prompt_logprobs for _, req in group]
        logits, scored = self.decoder.prefill_rows(rows, [req.prompt for _, req in group], score)
        for (_, req), s in zip(group, scored):
            req.state.prompt_logprobs = s
        generating = [req.budget > 0 for _, req in group]
        sample_rows([req.state for _, req in group], logits, generating)
        for (row, req), more in zip(group, generating):
            if more:
                self._advance(row, req)
            else:
                self._score_only(row, req)

    def _step(self) -> None:
        n = max(self._occupied()) + 1  # rows past the last running one are skipped
        live = [r is not None for r in self.rows[:n]]
        tokens = [r.state.tokens[-1] if r is not None else 0 for r in self.rows[:n]]
        start = time.perf_counter()
        logits = self.decoder.step(tokens, live)
        self.stats.steps += 1
        self.stats.step_rows += sum(live)
        log.debug("step of %d rows in %.1f ms", sum(live), 1e3 * (time.perf_counter() - start))
        states = [r.state if r is not None else None for r in self.rows[:n]]
        sample_rows(states, logits, live, self.decoder.greedy(logits))  # type: ignore[arg-type]
        for i in range(n):
            req = self.rows[i]
            if req is not None:
                self._advance(i, req)

    def _advance(self, row: int, req: Request) -> None:
        """After a new token: send it, and free the row when the request is done."""
        self.stats.generated_tokens += 1
        self._token_times.append(time.monotonic())
        if req.cancelled.is_set():
            return
        state = req.state
        check_finished(state, req.budget, self.decode)
        lps = state.logprobs[-1:] if state.logprobs is not None else []
        first = state.prompt_logprobs if len(state.tokens) == 1 else None
        if state.finish_reason is None:
            piece = req.stream.piece(state.tokens) if req.stream else ""
            self._emit(req, Event([state.tokens[-1]], piece, logprobs=lps, prompt_logprobs=first))
            return
        self.rows[row] = None
        self.stats.completed += 1
        result = to_result(state, self.decode)
        piece = req.stream.finish(result.text or "") if req.stream else ""
        event = Event([state.tokens[-1]], piece, result, logprobs=lps, prompt_logprobs=first)
        self._emit(req, event)

    def _score_only(self, row: int, req: Request) -> None:
        """A request that asked only for its prompt's log-probabilities (echo, no new
        token): done once prefilled."""
        if req.cancelled.is_set():
            return  # its row is freed and counted at the next boundary
        self.rows[row] = None
        self.stats.completed += 1
        req.state.finish_reason = "length"
        result = to_result(req.state, self.decode)
        self._emit(req, Event([], "", result=result, prompt_logprobs=result.prompt_logprobs))

    def _emit(self, req: Request, event: Event) -> None:
        """A listener that fails (its connection closed under it) loses its request, and
        nothing else: the batch goes on."""
        try:
            req.on_event(event)
        except Exception:  # noqa: BLE001 - whatever a listener raises must not stop the batch
            log.exception("request %d: its listener failed; cancelling it", req.id)
            req.cancel()

    def _drop_cancelled(self) -> None:
        for i, req in enumerate(self.rows):
            if req is not None and req.cancelled.is_set():
                self.rows[i] = None
                self.stats.cancelled += 1

    def _fail_all(self, message: str) -> None:
        with self._cond:
            pending = [r for r in self.rows if r is not None] + list(self.waiting)
            self.rows = [None] * len(self.rows)
            self.waiting.clear()
        for req in pending:
            self._emit(req, Event([], "", error=message))


def _prefill_groups(
    admitted: list[tuple[int, Request]], budget: int
) -> list[list[tuple[int, Request]]]:
    """Requests joining at one step boundary, in groups prefilled together: one forward reads
    each expert once for the group, instead of once per prompt. A group's padded size
    (distinct prompts x longest) stays within `budget` tokens; a longer prompt goes alone. A
    prompt given again (n choices) costs nothing more: it is prefilled once for its group."""
    groups: list[list[tuple[int, Request]]] = []
    for item in admitted:
        group = groups[-1] if groups else None
        if group is not None:
            prompts = {tuple(r.prompt) for _, r in group} | {tuple(item[1].prompt)}
            if max(len(p) for p in prompts) * len(prompts) <= budget:
                group.append(item)
                continue
        groups.append([item])
    return groups
