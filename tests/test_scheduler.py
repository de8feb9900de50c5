"""Tier 1: continuous batching — requests that join and leave a running batch get their solo
run's tokens; streaming text, cancellation, a full queue and a failing backend."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest

from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.scheduler import Event, QueueFull, Scheduler, SchedulerConfig
from offload_rt.engine.textstream import TextStream
from offload_rt.models import build_model

TIMEOUT = 60  # seconds for any one request in these tests


class Collector:
    """Gathers one request's events; `wait` returns them once the last one came."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.started = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.started.set()
        if event.result is not None or event.error is not None:
            self.done.set()

    def wait(self) -> list[Event]:
        assert self.done.wait(TIMEOUT), "the request did not finish"
        return self.events


def _scheduler(m, **kw) -> Scheduler:
    decode = m.tokenizer.decode if m.tokenizer else None
    return Scheduler(m.model, m.config.eos_token_ids, decode, SchedulerConfig(**kw))


def test_requests_joining_a_running_batch_get_their_solo_tokens(model):
    prompts = [[1, 5 + i, 9, 33 + 2 * i][: 2 + i % 3] + [7] * (i % 5) for i in range(10)]
    params = [
        SamplingParams(max_new_tokens=6 + 3 * (i % 4), temperature=0.0 if i % 3 else 0.8, seed=i)
        for i in range(10)
    ]
    solo = [
        model.generate(p, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, seed=i)
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]
    sched = _scheduler(model, max_batch=4)  # 10 requests, 4 rows: most join a running batch
    try:
        collectors = [Collector() for _ in prompts]
        for p, sp, c in zip(prompts, params, collectors):
            sched.submit(p, sp, c)
        for c, want in zip(collectors, solo):
            events = c.wait()
            result = events[-1].result
            assert result is not None and result.token_ids == want.token_ids
            assert result.finish_reason == want.finish_reason
            assert [t for e in events for t in e.token_ids] == want.token_ids
        assert sched.stats.completed == 10 and sched.running() == 0
        assert sched.stats.step_rows > sched.stats.steps  # rows really were batched
    finally:
        sched.close()


def test_streamed_pieces_add_up_to_the_text_and_stop_strings_cut(demo):
    solo = demo.generate("Hello there", max_new_tokens=40, seed=3, temperature=0.9)
    stop = solo.text[10:13]  # a stop string the sampled text is known to reach
    assert stop and stop in solo.text
    want = demo.generate("Hello there", max_new_tokens=40, seed=3, temperature=0.9, stop=stop)
    sched = _scheduler(demo)
    try:
        c = Collector()
        params = SamplingParams.with_stop(stop, max_new_tokens=40, temperature=0.9, seed=3)
        sched.submit(demo.encode("Hello there"), params, c)
        events = c.wait()
        assert events[-1].result.text == want.text and stop not in want.text
        assert "".join(e.text for e in events) == want.text
    finally:
        sched.close()


def test_text_stream_holds_back_unfinished_characters_and_possible_stops():
    texts = {1: "caf", 2: "caf\ufffd", 3: "café", 4: "café!"}
    plain = TextStream(lambda ids: texts[len(ids)], ())
    assert [plain.piece([0] * n) for n in range(1, 5)] == ["caf", "", "é", "!"]
    texts = {1: "ab", 2: "abcE", 3: "abcEN", 4: "abcENx"}
    stops = TextStream(lambda ids: texts[len(ids)], ("END",))  # the last 2 chars held back
    assert [stops.piece([0] * n) for n in range(1, 4)] == ["", "ab", "c"]
    assert stops.finish("abcENx") == "ENx"  # it did not become "END": the rest goes out
    cut = TextStream(lambda ids: texts[len(ids)], ("END",))
    assert cut.piece([0] * 3) == "abc"
    assert cut.finish("abc") == "" and cut.sent == "abc"  # "END" cut: nothing more


def test_cancelled_requests_free_their_rows_and_a_full_queue_refuses(model):
    sched = _scheduler(model, max_batch=1, max_queue=2)
    try:
        blocker = Collector()
        long = sched.submit(
            [1, 2, 3], SamplingParams(max_new_tokens=500, stop_token_ids=()), blocker
        )
        assert blocker.started.wait(TIMEOUT)  # running: the next ones wait
        sched.submit([1, 2], SamplingParams(max_new_tokens=2), Collector())
        third = Collector()
        sched.submit([1, 4], SamplingParams(max_new_tokens=2), third)
        with pytest.raises(QueueFull, match="try again later"):
            sched.submit([1, 5], SamplingParams(max_new_tokens=2), Collector())
        long.cancel()
        assert third.wait()[-1].result is not None  # the cancelled request's row came free
        assert sched.stats.cancelled == 1 and not blocker.done.is_set()
        assert sched.stats.refused == 1 and sched.running() == 0
    finally:
        sched.close()


def test_bad_prompts_are_refused_at_submit(model):
    sched = _scheduler(model, max_len=16)
    try:
        with pytest.raises(RequestError, match="16"):
            sched.submit([1] * 16, SamplingParams(), Collector())
        with pytest.raises(RequestError, match="token ids"):
            sched.submit([1, 10**9], SamplingParams(), Collector())
        with pytest.raises(RequestError, match="empty"):
            sched.submit([], SamplingParams(), Collector())
    finally:
        sched.close()


class FailingOnce:
    """An expert backend whose first call fails, as a dead actor past its retries would."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.failed = False

    def run(self, groups):
        if not self.failed:
            self.failed = True
            raise RuntimeError("expert actor expert-0 died")
        return self.inner.run(groups)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_scheduler_goes_on(model):
    want = model.generate([1, 2, 3], max_new_tokens=5)
    # the same checkpoint's decoder built over a backend whose first call fails
    failing = build_model(
        model.checkpoint, model.device, model.model.dtype, FailingOnce(model.backend)
    )
    decode = model.tokenizer.decode if model.tokenizer else None
    sched = Scheduler(failing, model.config.eos_token_ids, decode, SchedulerConfig())
    try:
        first = Collector()
        sched.submit([1, 2, 3], SamplingParams(max_new_tokens=5), first)
        assert "expert-0 died" in first.wait()[-1].error
        second = Collector()
        sched.submit([1, 2, 3], SamplingParams(max_new_tokens=5), second)
        assert second.wait()[-1].result.token_ids == want.token_ids
        assert sched.stats.failed == 1
    finally:
        sched.close()


def test_close_ends_waiting_requests_with_an_error(model):
    sched = _scheduler(model, max_batch=1)
    events: queue.Queue[Event] = queue.Queue()
    sched.submit([1, 2, 3], SamplingParams(max_new_tokens=10_000, stop_token_ids=()), events.put)
    sched.close()
    last = None
    while not events.empty():
        last = events.get()
    assert last is not None and last.error and "shutting down" in last.error


def test_prefill_groups_keep_within_the_token_budget():
    from offload_rt.engine.scheduler import _prefill_groups

    def req(n: int):
        return SimpleNamespace(prompt=[1] * n)

    admitted = [(i, req(n)) for i, n in enumerate([3, 5, 2, 40, 4, 4])]
    groups = _prefill_groups(admitted, budget=16)
    assert [[row for row, _ in g] for g in groups] == [[0, 1, 2], [3], [4, 5]]
    assert all(max(len(r.prompt) for _, r in g) * len(g) <= 16 for g in groups if len(g) > 1)
    copies = [(i, req(6)) for i in range(5)]  # one prompt, n = 5: one prefill of 6 tokens
    assert len(_prefill_groups(copies, budget=16)) == 1


def _good():
    return [1, 2, 3], SamplingParams(max_new_tokens=3), Collector()


def test_submit_together_queues_all_or_none(model):
    sched = _scheduler(model, max_batch=1, max_queue=2)
    try:
        with pytest.raises(RequestError, match="token ids"):
            sched.submit_together([_good(), ([1, 10**9], SamplingParams(), Collector()), _good()])
        assert sched.stats.submitted == 0 and sched.queue_depth() == 0
        with pytest.raises(QueueFull):  # 1 free row + 2 waiting places: 4 is one too many
            sched.submit_together([_good() for _ in range(4)])
        assert sched.stats.submitted == 0 and sched.stats.refused == 4
        items = [_good() for _ in range(3)]
        sched.submit_together(items)
        assert all(c.wait()[-1].result.token_ids for _, _, c in items)
    finally:
        sched.close()
