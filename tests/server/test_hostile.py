"""Tier 4: hundreds of malformed or hostile requests each get a 4xx — never a 5xx, never a
hang — and the server still answers correctly afterwards."""

from __future__ import annotations

import itertools
import json

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
# as the openai client sends it: without it FastAPI reads no JSON and every body is a 400
# before any field is looked at
JSON = {**AUTH, "content-type": "application/json"}
CONTEXT = 2048  # the demo's
BAD_VALUES = ["8", [8], {"a": 1}, True, -1, 10**30, -(10**30), 1e308, None, "", [], [[[]]]]
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "logprobs",
          "presence_penalty", "logit_bias", "stream_options", "max_completion_tokens",
          "top_logprobs", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
          "echo", "response_format"]  # fmt: skip


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
            cases.append(("POST", path, JSON, _dumps(body)))
        for raw in [b"", b"{", b"[]", b"null", b"42", b'"x"', b"{'a': 1}", b"\xff\xfe", b"{" * 5000,
                    b'{"prompt": "Hi", "max_tokens": 4', b"NaN", b'{"prompt": NaN}']:  # fmt: skip
            cases.append(("POST", path, JSON, raw))
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
        {"prompt": "Hi", "echo": True, "max_tokens": -1},
        {"prompt": "Hi", "best_of": 3},
        {"prompt": "Hi", "n": 17},
        {},
    ]
    cases += [("POST", "/v1/completions", JSON, _dumps(b)) for b in completions]
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
        {"messages": [{"role": "developer", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
        {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": 5, "function": {}}]}]},
    ]
    cases += [("POST", "/v1/chat/completions", JSON, _dumps(b)) for b in chats]
    return cases


def _acceptable(path: str, field: str, value: object) -> bool:
    """The few (field, value) pairs of the grid that make a valid request."""
    ok = [("stop", None), ("stop", []), ("stop", "8"), ("seed", None), ("logprobs", None),
          ("top_k", -1), ("top_k", 10**30), ("max_tokens", None), ("max_completion_tokens", None),
          ("logit_bias", None), ("logit_bias", {}), ("stream_options", None),
          ("stream_options", {"a": 1}), ("stream", True), ("presence_penalty", -1),
          ("frequency_penalty", -1), ("top_logprobs", None), ("ignore_eos", True),
          ("response_format", None)]  # fmt: skip
    chat_only = ("max_completion_tokens", "top_logprobs")
    if (
        path == "/v1/completions"
        and field in chat_only
        or path != "/v1/completions"
        and (field == "echo")
    ):
        return True  # the other endpoint's field: ignored, as any extra
    if path == "/v1/completions":
        ok.append(("echo", True))
    else:
        ok.append(("logprobs", True))
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


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _deep(depth: int) -> dict:
    """An object nested `depth` levels deep."""
    schema: dict = {"type": "boolean"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


COMPLETION = {"prompt": "Hi", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# (path, body, a fragment the error message must hold: the field at fault)
NEW_FIELDS = [
    ("/v1/completions", {"n": 10**6}, "body.n"),
    ("/v1/completions", {"n": 0}, "body.n"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "n": 16}, "n = 16"),
    ("/v1/completions", {"logprobs": 21}, "body.logprobs"),
    ("/v1/completions", {"logprobs": 1000}, "body.logprobs"),
    ("/v1/completions", {"logprobs": -1}, "body.logprobs"),
    ("/v1/completions", {"echo": "yes"}, "body.echo"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens must be in [1,"),
    ("/v1/completions", {"echo": True, "max_tokens": -1}, "max_tokens must be in [0,"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias keys"),
    ("/v1/completions", {"logit_bias": {"999999": 1}}, "logit_bias: token ids"),
    ("/v1/completions", {"logit_bias": {"5": "x"}}, "body.logit_bias.5"),
    ("/v1/completions", {"logit_bias": {"5": None}}, "body.logit_bias.5"),
    ("/v1/completions", {"logit_bias": {"5": 1e9}}, "logit_bias of token 5"),
    ("/v1/completions", {"logit_bias": {"-3": 1}}, "logit_bias token id"),
    ("/v1/completions", {"logit_bias": [1, 2]}, "body.logit_bias"),
    ("/v1/completions", {"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias has 2000"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"min_tokens": 5}, "min_tokens (5) must be at most"),
    ("/v1/completions", {"min_tokens": "3"}, "body.min_tokens"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"repetition_penalty": 3}, "repetition_penalty"),
    ("/v1/completions", {"repetition_penalty": "x"}, "body.repetition_penalty"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"ignore_eos": "yes"}, "body.ignore_eos"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"seed": 2**63 - 2, "n": 3}, "seed"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1000}, "body.top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"logprobs": 5}, "body.logprobs"),
    ("/v1/chat/completions", {"n": 10**9}, "body.n"),
    ("/v1/chat/completions", {"logit_bias": {"x1": 2}}, "logit_bias keys"),
    ("/v1/chat/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens must be in [1,"),
] + [
    (path, {"response_format": fmt}, fragment)
    for path in ("/v1/completions", "/v1/chat/completions")
    for fmt, fragment in [
        ("json", "body.response_format"),
        ({}, "body.response_format"),
        ({"type": "xml"}, "body.response_format: Input tag 'xml'"),
        ({"type": None}, "body.response_format"),
        ({"type": "json_schema"}, "body.response_format.json_schema.json_schema: Field required"),
        ({"type": "json_schema", "json_schema": "{}"}, "response_format.json_schema.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema: Field req"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name: Field req"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "schema: Input should",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
            "schema: Input should",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
            "json_schema.strict",
        ),
        (_schema({"type": "nope"}), "json_schema cannot be compiled: Invalid type: nope"),
        (_schema({"not": {"type": "null"}}), "Unimplemented keys"),
        (_schema({"type": "string", "pattern": "(?=a)"}), "look-around"),
        (_schema({"type": "string", "pattern": "[z-a]"}), "json_schema cannot be compiled"),
        (_schema({"$ref": "#/$defs/gone"}), "does not exist"),
        (_schema({"$ref": "http://example.com/s.json"}), "json_schema cannot be compiled"),
        (_schema({"type": "integer", "minimum": 9, "maximum": 1}), "Unsatisfiable"),
        (_schema({"type": "string", "minLength": 5, "maxLength": 1}), "Unsatisfiable"),
        (_schema({"enum": []}), "Unsatisfiable"),
        (_schema({"type": "array", "minItems": 3, "maxItems": 1}), "json_schema cannot be"),
        (_schema({"properties": {"a": {"type": "wat"}}, "required": ["a"]}), "Invalid type"),
        (_schema(_deep(300)), "json_schema cannot be compiled"),
    ]
]
NEW_NATIVE = [
    ({"json_schema": 5}, "json_schema must be"),
    ({"json_schema": [1]}, "json_schema must be"),
    ({"json_schema": "{"}, "json_schema is not valid JSON"),
    ({"json_schema": "[1]"}, "json_schema must be a JSON object"),
    ({"json_schema": {"type": "nope"}}, "json_schema cannot be compiled"),
    ({"logprobs": 50}, "logprobs must be at most 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"logit_bias": {"a": 1}}, "logit_bias must be"),
    ({"logit_bias": [[1]]}, "logit_bias entries"),
    ({"logit_bias": [[10**9, 1.0]]}, "logit_bias: token ids"),
    ({"logit_bias": [[1, "x"]]}, "logit_bias of token 1"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": "a"}, "presence_penalty"),
]


def test_the_new_fields_are_refused_by_name_and_the_server_serves_after(guarded, demo_model):
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for path, body, fragment in NEW_FIELDS:
            base = COMPLETION if path == "/v1/completions" else CHAT
            r = http.post(path, headers=AUTH, json={**base, **body})
            assert r.status_code == 400, (path, body, r.status_code, r.text[:300])
            assert fragment in r.json()["error"]["message"], (body, r.text[:300])
        for body in NEW_NATIVE:
            packed = msgpack.packb({"prompt": "Hi", "max_new_tokens": 4, **body[0]})
            r = http.post(protocol.PATH, headers=AUTH, content=packed)
            assert r.status_code == 400, (body, r.status_code)
            assert body[1] in msgpack.unpackb(r.content)["message"], (body, r.content[:300])
        kw = dict(max_new_tokens=6, presence_penalty=1.0, logit_bias={40: 3.0}, min_tokens=2)
        want = demo_model.generate("Hello", **kw).text
        r = http.post("/v1/completions", headers=AUTH, json={
            "prompt": "Hello", "max_tokens": 6, "temperature": 0, "presence_penalty": 1.0,
            "logit_bias": {"40": 3}, "min_tokens": 2})  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        schema = {"enum": ["yes", "no"]}
        r = http.post("/v1/chat/completions", headers=AUTH, json={
            **CHAT, "max_tokens": 20, "response_format": _schema(schema)})  # fmt: skip
        assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"])
    assert guarded.scheduler.running() == 0 and guarded.scheduler.stats.failed == 0
