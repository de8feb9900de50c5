"""Constrained decoding in the engine: the mask per row, EOS only where the grammar may end,
the grammar beside min_tokens, one compile per schema, and bad schemas refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.grammar import Grammars, schema_text
from offload_rt.engine.rows import new_state, sample_rows

EOS = 2  # the demo's </s>
DIGITS = {"type": "integer"}  # no bound: only EOS can end it


def test_eos_only_where_the_grammar_may_end(demo):
    # EOS is the likeliest token everywhere; the grammar holds it back until a digit is out
    got = demo.generate("n =", max_new_tokens=40, json_schema=DIGITS, logit_bias={EOS: 100.0})
    assert got.finish_reason == "stop" and got.token_ids[-1] == EOS
    assert got.text.lstrip("-").isdigit() and len(got.token_ids) <= 3  # "-"?, a digit, EOS
    free = demo.generate("n =", max_new_tokens=40, logit_bias={EOS: 100.0})
    assert free.token_ids == [EOS]


def test_a_complete_grammar_wins_over_min_tokens(demo):
    schema = {"enum": ["yes", "no"]}
    got = demo.generate("ok?", max_new_tokens=20, min_tokens=10, json_schema=schema)
    assert got.finish_reason == "stop" and json.loads(got.text) in ("yes", "no")
    assert len(got.token_ids) < 10


def test_rows_with_and_without_grammars_in_one_batch(demo):
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 2}
    params = [
        SamplingParams(max_new_tokens=30, json_schema=schema),
        SamplingParams(max_new_tokens=30),
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, json_schema=DIGITS),
    ]
    prompts = [demo.encode(p) for p in ("list:", "free text", "number:")]
    rows = [new_state(p, sp, (EOS,), demo.grammars) for p, sp in zip(prompts, params)]
    logits = demo.logits(prompts[0])[-1:].repeat(3, 1)  # (3, V): the same scores for every row
    sample_rows(rows, logits, [True, True, True])
    assert demo.tokenizer.decode(rows[0].tokens) == "["
    assert rows[1].tokens == [int(logits[1].argmax())]  # untouched by the others' masks
    assert demo.tokenizer.decode(rows[2].tokens) in "-0123456789"


def test_the_mask_keeps_only_the_allowed_tokens(demo):
    row = demo.grammars.row(schema_text({"enum": ["xy"]}))
    scores = torch.zeros(demo.config.vocab_size)
    row.mask(scores, scores.clone())
    (allowed,) = torch.nonzero(scores == 0)[:, 0].tolist()  # only the opening quote
    assert demo.tokenizer.decode([allowed]) == '"'
    assert torch.isneginf(scores).sum() == scores.numel() - 1
    # everything else already -inf (min_tokens' mask on the only stop): the grammar's tokens
    # by the raw logits
    raw = torch.randn(demo.config.vocab_size, generator=torch.Generator().manual_seed(0))
    scores = torch.full_like(raw, float("-inf"))
    row.mask(scores, raw)
    assert scores[allowed] == raw[allowed] and torch.isneginf(scores).sum() == raw.numel() - 1


def test_each_schema_compiles_once(demo):
    grammars = Grammars(demo.tokenizer.tokenizer, demo.config.vocab_size, [EOS])
    a, b = schema_text({"type": "boolean"}), schema_text({"type": "null"})
    counts = []
    for schema in (a, b, a, a, b):
        grammars.compile(schema)
        grammars.row(schema)
        counts.append(grammars.compiled)
    assert counts == [1, 2, 2, 2, 2]


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ({"type": "nope"}, "Invalid type: nope"),
        ({"not": {"type": "string"}}, "Unimplemented keys"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
    ],
)
def test_schemas_the_library_cannot_compile_are_refused_by_name(demo, schema, fragment):
    with pytest.raises(RequestError, match="json_schema cannot be compiled") as e:
        demo.generate("x", max_new_tokens=4, json_schema=schema)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "schema, fragment",
    [("[1, 2]", "must be a JSON object"), ("{", "not valid JSON"), (5, "must be a JSON object"),
     ({"a": float("nan")}, "not JSON")],
)  # fmt: skip
def test_malformed_schemas_are_refused(schema, fragment):
    with pytest.raises(RequestError, match=fragment):
        SamplingParams(json_schema=schema)


def test_a_model_without_tokenizer_refuses_json_schema(demo):
    params = SamplingParams(json_schema={"type": "boolean"})
    with pytest.raises(RequestError, match="needs the model's tokenizer.json"):
        new_state([1, 2], params, (EOS,), None)
