"""Tier 4: the Python client (`offload_rt.connect`, `connect_async`) against a live server:
same results as the local model, streaming, clear exceptions; and 32 concurrent streams
that each get their solo run's tokens."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

import offload_rt
from offload_rt.engine import RequestError
from offload_rt.engine.scheduler import SchedulerConfig
from offload_rt.protocol import AuthenticationError, InvalidRequest, RemoteError, ServerBusy
from offload_rt.server import ServerConfig
from tests.server.live import LiveServer

PROMPTS = ["Hello", "The quick brown fox", "offload", [1, 40, 41, 42]]


@pytest.fixture(scope="module")
def remote(live):
    with offload_rt.connect(live.url) as m:
        yield m


def test_generate_equals_local_for_one_prompt_and_a_batch(remote, demo_model):
    for kw in ({"max_new_tokens": 10}, {"max_new_tokens": 12, "temperature": 0.7, "seed": 3}):
        assert remote.generate("Hello", **kw) == demo_model.generate("Hello", **kw)
    assert remote.generate(PROMPTS, max_new_tokens=8) == demo_model.generate(
        PROMPTS, max_new_tokens=8
    )
    want = demo_model.generate("Hello", max_new_tokens=30, stop=["\n", 77])
    assert remote.generate("Hello", max_new_tokens=30, stop=["\n", 77]) == want


def test_stream_yields_pieces_that_add_up_to_the_text(remote, demo_model):
    want = demo_model.generate("The quick brown fox", max_new_tokens=24)
    pieces = list(remote.stream("The quick brown fox", max_new_tokens=24))
    assert len(pieces) > 1 and "".join(pieces) == want.text


def test_async_client_generates_and_streams(live, demo_model):
    want = demo_model.generate(PROMPTS, max_new_tokens=8)

    async def main():
        async with offload_rt.connect_async(live.url) as m:
            batch = await m.generate(PROMPTS, max_new_tokens=8)
            pieces = [p async for p in m.stream("Hello", max_new_tokens=8)]
        return batch, "".join(pieces)

    batch, text = asyncio.run(main())
    assert batch == want and text == want[0].text


def test_server_errors_become_clear_exceptions(live, demo_model):
    with offload_rt.connect(live.url) as m:
        with pytest.raises(InvalidRequest, match="top_p") as e:
            m.generate("Hello", top_p=2.0)
        assert isinstance(e.value, RequestError) and e.value.status == 400
        with pytest.raises(InvalidRequest, match="token ids must lie in"):
            m.generate([1, 10**6])
        with pytest.raises(InvalidRequest, match="unknown request fields: beam_width"):
            m.generate("Hello", beam_width=4)
    config = ServerConfig(api_key="s3cret")
    with LiveServer(demo_model, config) as server:
        with offload_rt.connect(server.url, api_key="nope") as m:
            with pytest.raises(AuthenticationError):
                m.generate("Hello", max_new_tokens=2)
        with offload_rt.connect(server.url, api_key="s3cret") as m:
            assert m.generate("Hello", max_new_tokens=2).token_ids


def test_a_full_queue_raises_server_busy(demo_model):
    config = ServerConfig(scheduler=SchedulerConfig(max_batch=1, max_queue=1))
    ended: list[Exception] = []

    def long_request(m, stream: bool) -> None:
        kw = dict(max_new_tokens=1500, stop=[])
        try:
            list(m.stream("Hello", **kw)) if stream else m.generate("Hello", **kw)
        except RemoteError as e:
            ended.append(e)

    with LiveServer(demo_model, config) as server, offload_rt.connect(server.url) as m:
        first = threading.Thread(target=long_request, args=(m, True))
        second = threading.Thread(target=long_request, args=(m, False))
        first.start()
        try:
            while server.scheduler.running() == 0:
                threading.Event().wait(0.02)
            second.start()
            while server.scheduler.queue_depth() == 0:
                threading.Event().wait(0.02)
            with pytest.raises(ServerBusy, match="try again later"):
                m.generate("Hello", max_new_tokens=2)
        finally:
            server.scheduler.close()  # ends the two long requests with an error
            first.join(30)
            second.join(30)
    assert len(ended) == 2 and all("shutting down" in str(e) for e in ended)


def test_an_unreachable_server_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nobody answers
        with offload_rt.connect(f"http://127.0.0.1:{port}") as m:
            with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
                m.generate("Hello")


def test_32_concurrent_streams_each_get_their_solo_tokens(demo_model):
    """Each client streams through the native endpoint; the server batches them (16 rows),
    and every client's tokens equal its prompt's solo run."""
    prompts = [f"request {i}: " + "ab" * (i % 7) for i in range(32)]
    solo = [demo_model.generate(p, max_new_tokens=12 + i % 5) for i, p in enumerate(prompts)]
    config = ServerConfig(scheduler=SchedulerConfig(max_batch=16))
    with LiveServer(demo_model, config) as server:

        async def one(m, i: int) -> tuple[list[int], str]:
            ids, text = [], ""
            async for new_ids, piece in m.stream_tokens(prompts[i], max_new_tokens=12 + i % 5):
                ids += new_ids
                text += piece
            return ids, text

        async def main():
            async with offload_rt.connect_async(server.url) as m:
                return await asyncio.gather(*(one(m, i) for i in range(32)))

        got = asyncio.run(main())
        stats = server.scheduler.stats
    for (ids, text), want in zip(got, solo):
        assert ids == want.token_ids and text == want.text
    assert stats.completed == 32 and stats.step_rows / stats.steps > 4  # really batched
