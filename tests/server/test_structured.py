"""Tier 4: response_format through the real `openai` client. On the random-weight demo model,
20 JSON schemas each give output that parses and validates (the `jsonschema` package), sent
concurrently into one continuous batch beside unstructured requests that must come out as
they do alone; json_object mode; log-probabilities of the raw distribution; streams; the
native endpoint and the Python client.

A random model rambles inside a string or a number forever: every schema bounds its strings
(maxLength, enum, pattern, format) and numbers, and max_tokens is generous, so every request
ends with its grammar ("stop")."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch

import offload_rt
from tests.server.conftest import MODEL_NAME

NAME = {"type": "string", "maxLength": 8}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}


def obj(props: dict, required: list[str] | None = None) -> dict:
    """An object of exactly these properties (all required unless said)."""
    req = list(props) if required is None else required
    return {"type": "object", "properties": props, "required": req, "additionalProperties": False}


SCHEMAS = {
    "flat_object": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "member": {"type": "boolean"}}),
    "enum_string": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": ["on", 1, None, True]},
    "const": obj({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -10,
                                                     "maximum": 10}}),
    "integer_bounds": {"type": "integer", "minimum": 10, "maximum": 99},
    "number_bounds": obj({"t": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                          "p": {"type": "number", "minimum": 0, "maximum": 1}}),
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                       "maxItems": 4},
    "array_bounds": {"type": "array", "items": DIGIT, "minItems": 2, "maxItems": 5},
    "tuple": {"type": "array", "prefixItems": [{"type": "boolean"}, DIGIT, NAME], "items": False,
              "minItems": 3},
    "nested": obj({"user": obj({"name": NAME, "tags": {"type": "array", "items": NAME,
                                                       "maxItems": 3}}),
                   "score": {"type": "integer", "minimum": 0, "maximum": 100}}),
    "deep_nesting": obj({"a": obj({"b": obj({"c": obj({"d": {"type": "boolean"}})})})}),
    "optional_props": obj({"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                           "note": NAME, "flag": {"type": "boolean"}}, required=["id"]),
    "string_length": obj({"code": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "string_pattern": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    "string_format": obj({"day": {"type": "string", "format": "date"}}),
    "booleans_and_null": obj({"yes": {"type": "boolean"}, "no": {"type": "boolean"},
                              "nothing": {"type": "null"}}),
    "nullable": obj({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 50},
                     "w": {"anyOf": [NAME, {"type": "null"}]}}),
    "any_of": {"anyOf": [obj({"circle": DIGIT}), obj({"square": {"type": "boolean"}}),
                         {"enum": ["none"]}]},
    "array_of_objects": {"type": "array", "items": obj({"k": {"enum": ["x", "y"]}, "n": DIGIT}),
                         "minItems": 1, "maxItems": 3},
    "refs": {"$defs": {"pt": obj({"x": DIGIT, "y": DIGIT})},
             **obj({"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}})},
}  # fmt: skip
PLAIN = ["The experts", "Once upon a time", "1, 2, 3,", "Hello there"]  # unstructured rows
MAX_TOKENS = 300  # far past what any of the schemas above needs
CHAT = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def validate(text: str, schema: dict) -> None:
    checker = jsonschema.FormatChecker()
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(json.loads(text))


def _structured(client, k: int, name: str) -> tuple[str, str]:
    """Even requests greedy through chat, odd ones sampled (seeded) through completions."""
    if k % 2 == 0:
        got = client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
            response_format=schema_format(name),
        )  # fmt: skip
        return got.choices[0].message.content, got.choices[0].finish_reason
    got = client.completions.create(
        model=MODEL_NAME, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=k,
        extra_body={"response_format": schema_format(name)},
    )  # fmt: skip
    return got.choices[0].text, got.choices[0].finish_reason


def _plain(client, prompt: str) -> str:
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
    return got.choices[0].text


def test_twenty_schemas_in_one_batch_beside_free_text(client, live, demo_model):
    assert len(SCHEMAS) == 20
    jobs = [(k, n) for k, n in enumerate(SCHEMAS)]
    with ThreadPoolExecutor(8) as pool:  # more requests than the batch's 8 rows: rows come and go
        plain = [pool.submit(_plain, client, p) for p in PLAIN[:2]]
        structured = [pool.submit(_structured, client, k, n) for k, n in jobs]
        plain += [pool.submit(_plain, client, p) for p in PLAIN[2:]]
        results = [f.result() for f in structured]
        texts = [f.result() for f in plain]
    for (_, name), (text, finish) in zip(jobs, results):
        assert finish == "stop", (name, text)
        validate(text, SCHEMAS[name])
    for prompt, text in zip(PLAIN, texts):  # the masks of other rows never touch these
        assert text == demo_model.generate(prompt, max_new_tokens=24).text
    assert live.scheduler.stats.failed == 0


def test_json_object_mode_and_text_mode(client, demo_model):
    close = demo_model.tokenizer.encode("}", add_special_tokens=False)[0]
    got = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_object"}, logit_bias={str(close): 100},
    )  # fmt: skip
    # "}" is the likeliest token everywhere: the grammar holds it back until an object opens
    assert got.choices[0].message.content == "{}" and got.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, logit_bias={str(close): 100}
    )
    assert free.choices[0].message.content == "}}}}"
    as_text = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
        response_format={"type": "text"},
    )  # fmt: skip
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0
    )
    assert as_text.choices[0].message.content == plain.choices[0].message.content


def test_logprobs_are_the_models_own_distribution(client, demo_model):
    got = client.completions.create(
        model=MODEL_NAME, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
        extra_body={"response_format": schema_format("nested")},
    )  # fmt: skip
    choice = got.choices[0]
    validate(choice.text, SCHEMAS["nested"])
    tok = demo_model.tokenizer
    ids_of = {tok.token_text(i): i for i in range(demo_model.config.vocab_size)}
    new = [ids_of[t] for t in choice.logprobs.tokens]
    prompt = demo_model.encode("JSON:")
    logits = demo_model.logits(prompt + new[:-1])[len(prompt) - 1 :]  # (len(new), V)
    want = torch.log_softmax(logits.float(), dim=-1)
    got_lp = torch.tensor(choice.logprobs.token_logprobs)
    assert torch.allclose(got_lp, want[torch.arange(len(new)), new], atol=1e-4)
    # where the grammar overrode the model, its own favourite is still the top logprob
    overridden = [i for i, t in enumerate(new) if int(want[i].argmax()) != t]
    assert len(overridden) > len(new) // 2
    top = [max(d, key=d.get) for d in choice.logprobs.top_logprobs]
    assert all(ids_of[top[i]] == int(want[i].argmax()) for i in overridden)


def test_a_stream_follows_the_schema(client):
    pieces, finish = [], None
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0.7, seed=5,
        response_format=schema_format("array_of_objects"), stream=True,
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    validate("".join(pieces), SCHEMAS["array_of_objects"])


def test_native_endpoint_and_client_take_json_schema(live, demo_model):
    schema = SCHEMAS["refs"]
    remote = offload_rt.connect(live.url)
    got = remote.generate("JSON:", max_new_tokens=MAX_TOKENS, json_schema=schema)
    want = demo_model.generate("JSON:", max_new_tokens=MAX_TOKENS, json_schema=schema)
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    validate(got.text, schema)
    text = "".join(
        remote.stream("JSON:", max_new_tokens=MAX_TOKENS, json_schema=json.dumps(schema))
    )
    assert text == want.text
