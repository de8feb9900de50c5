"""Tier 4: hundreds of malformed or hostile requests each get a 4xx — never a 5xx, never a
hang — and the server still answers correctly afterwards."""

from __future__ import annotations

import itertools

import httpx
import msgpack
import pytest

from offload_rt import protocol
from offload_rt.engine.scheduler import SchedulerConfig
from offload_rt.server import ServerConfig
from tests.server.conftest import MODEL_NAME
from tests.server.live import LiveServer

KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}
CONTEXT = 2048  # the demo's
BAD_VALUES = ["8", [8], {"a": 1}, True, -1, 10**30, -(10**30), 1e308, None, "", [], [[[]]]]
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "logprobs",
          "presence_penalty", "logit_bias", "stream_options", "max_completion_tokens"]  # fmt: skip


def _json_cases() -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) for the JSON endpoints."""
    cases = []
    good_completion = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4}
    good_chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for path, good in (("/v1/completions", good_completion), ("/v1/chat/completions", good_chat)):
        for field, value in itertools.product(FIELDS, BAD_VALUES):
            body = {**good, field: value}
            if _acceptable(path, field, value):
                continue
            cases.append(("POST", path, AUTH, _dumps(body)))
        for raw in [b"", b"{", b"[]", b"null", b"42", b'"x"', b"{'a': 1}", b"\xff\xfe", b"{" * 5000,
                    b'{"prompt": "Hi", "max_tokens": 4', b"NaN", b'{"prompt": NaN}']:  # fmt: skip
            cases.append(("POST", path, AUTH, raw))
    completions = [
        {"prompt": 5},
        {"prompt": None},
        {"prompt": []},
        {"prompt": [1, "a"]},
        {"prompt": [10**9]},
        {"prompt": [-5, 3]},
        {"prompt": [[1, 2], "x"]},
        {"prompt": ["a"] * 1000},
        {"prompt": "Hi", "max_tokens": CONTEXT},
        {"prompt": "Hi " * 800, "max_tokens": 4},  # more tokens than the context
        {"prompt": "Hi", "max_tokens": 0},
        {"prompt": "Hi", "temperature": 2.5},
        {"prompt": "Hi", "top_p": 0},
        {"prompt": "Hi", "top_p": 1.5},
        {"prompt": "Hi", "seed": 2**70},
        {"prompt": "Hi", "stop": [""]},
        {"prompt": "Hi", "stop": ["x"] * 100},
        {"prompt": "Hi", "echo": True},
        {"prompt": "Hi", "best_of": 3},
        {"prompt": "Hi", "n": 2},
        {},
    ]
    cases += [("POST", "/v1/completions", AUTH, _dumps(b)) for b in completions]
    chats = [
        {"messages": []},
        {"messages": "Hi"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"content": "Hi"}]},
        {"messages": [{"role": "robot", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "system", "content": "a"}]},  # the Mixtral template refuses it
        {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
    ]
    cases += [("POST", "/v1/chat/completions", AUTH, _dumps(b)) for b in chats]
    return cases


def _acceptable(path: str, field: str, value: object) -> bool:
    """The few (field, value) pairs of the grid that make a valid request."""
    ok = [("stop", None), ("stop", []), ("seed", None), ("logprobs", None), ("top_k", -1),
          ("max_tokens", None), ("max_completion_tokens", None), ("logit_bias", None),
          ("logit_bias", {}), ("stream_options", None), ("stream_options", {"a": 1}),
          ("stream", True)]  # fmt: skip
    if path == "/v1/completions" and field == "max_completion_tokens":
        return True  # a chat field: /v1/completions ignores it, as it ignores any extra
    return any(field == f and type(value) is type(v) and value == v for f, v in ok)


def _dumps(body: object) -> bytes:
    import json

    return json.dumps(body).encode()


def _native_cases() -> list[tuple[str, str, dict, bytes]]:
    good = msgpack.packb({"prompt": "Hi", "max_new_tokens": 4})
    bodies = [
        b"",
        good[:-1],
        good[:3],
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb("prompt"),
        msgpack.packb({"max_new_tokens": 4}),
        msgpack.packb({"prompt": "Hi", "v": 99}),
        msgpack.packb({"prompt": "Hi", "evil": 1}),
        msgpack.packb({"prompt": b"bytes"}),
        msgpack.packb({"prompt": [1, "x"]}),
        msgpack.packb({"prompt": [True, False]}),
        msgpack.packb({"prompt": [10**9]}),
        msgpack.packb({"prompt": "Hi", "max_new_tokens": -1}),
        msgpack.packb({"prompt": "Hi", "max_new_tokens": 2**63}),
        msgpack.packb({"prompt": "Hi", "max_new_tokens": True}),
        msgpack.packb({"prompt": "Hi", "temperature": "hot"}),
        msgpack.packb({"prompt": "Hi", "temperature": float("nan")}),
        msgpack.packb({"prompt": "Hi", "top_p": 0.0}),
        msgpack.packb({"prompt": "Hi", "top_k": -3}),
        msgpack.packb({"prompt": "Hi", "seed": -1}),
        msgpack.packb({"prompt": "Hi", "stop": {"a": 1}}),
        msgpack.packb({"prompt": "Hi", "stop": [1.5]}),
        msgpack.packb({"prompt": "Hi", "stream": "yes"}),
        msgpack.packb({"prompt": "Hi " * 900}),
        msgpack.packb({1: 2}),
        b"\x92\x01",  # an array that promises two items and holds one
        b"\xdd\xff\xff\xff\xff",  # an array header claiming four billion items
        b"\xdb\x7f\xff\xff\xff" + b"x" * 10,  # a string header claiming 2 GiB
    ]
    return [("POST", protocol.PATH, AUTH, b) for b in bodies]


def _transport_cases() -> list[tuple[str, str, dict, bytes]]:
    body = _dumps({"prompt": "Hi", "max_tokens": 2})
    cases = [
        ("POST", "/v1/completions", {}, body),
        ("POST", "/v1/completions", {"authorization": "Bearer wrong"}, body),
        ("POST", "/v1/completions", {"authorization": f"Basic {KEY}"}, body),
        ("POST", "/v1/completions", {"authorization": KEY}, body),
        ("POST", "/v1/completions", {"authorization": f"Bearer {KEY}x"}, body),
        ("GET", "/v1/models", {}, b""),
        ("GET", "/metrics", {"authorization": "Bearer"}, b""),
        ("POST", protocol.PATH, {}, msgpack.packb({"prompt": "Hi"})),
        ("GET", "/v1/completions", AUTH, b""),
        ("DELETE", "/v1/models", AUTH, b""),
        ("GET", "/v1/nothing-here", AUTH, b""),
        ("GET", "/../../etc/passwd", AUTH, b""),
        ("POST", "/v1/completions", AUTH, b"x" * (protocol.MAX_REQUEST_BYTES + 1)),
        ("POST", protocol.PATH, AUTH, b"\x00" * (2 * protocol.MAX_REQUEST_BYTES)),
    ]
    return cases


@pytest.fixture(scope="module")
def guarded(demo_model):
    config = ServerConfig(
        api_key=KEY, served_model_name=MODEL_NAME, scheduler=SchedulerConfig(max_batch=4)
    )
    with LiveServer(demo_model, config) as server:
        yield server


def test_hostile_requests_get_4xx_and_the_server_goes_on(guarded, demo_model):
    cases = _json_cases() + _native_cases() + _transport_cases()
    assert len(cases) >= 200
    statuses = {}
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for i, (method, path, headers, body) in enumerate(cases):
            r = http.request(method, path, headers=headers, content=body)
            assert 400 <= r.status_code < 500, (i, path, body[:120], r.status_code, r.text[:300])
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code in (400, 401, 413):  # these carry a message naming the fault
                assert len(r.content) > 10
        assert set(statuses) >= {400, 401, 404, 405, 413}
        want = demo_model.generate("Hello", max_new_tokens=6).text
        r = http.post("/v1/completions", headers=AUTH, json={"prompt": "Hello", "max_tokens": 6,
                                                              "temperature": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert guarded.scheduler.running() == 0 and guarded.scheduler.stats.failed == 0
