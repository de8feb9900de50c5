"""Tier 4: penalties, logit_bias, min_tokens, ignore_eos and n through the real `openai`
client. Greedy tokens equal the reference loop of tests/test_penalties.py (the definitions
applied to the transformers reference's logits), for requests sent concurrently into one
continuous batch; n choices are independent and, with a seed, the same twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import offload_rt
from offload_rt.protocol import InvalidRequest
from tests.server.conftest import MODEL_NAME
from tests.test_penalties import EOS, reference_loop

PROMPT = "The experts of the quick brown fox"
NEW = 12
# the demo's greedy run repeats no token of its own: negative penalties (or a bias) make it
OPTIONS = [
    dict(presence_penalty=-2.0, frequency_penalty=0.5),
    dict(frequency_penalty=-1.0),
    dict(repetition_penalty=0.3),
    dict(logit_bias={60: 4.0}, frequency_penalty=2.0),
    dict(presence_penalty=0.5, repetition_penalty=1.2, logit_bias={60: 4.0, 70: -100.0}),
    dict(logit_bias={EOS: 7.0}, min_tokens=4),
    dict(logit_bias={EOS: 7.0}, ignore_eos=True),
]
VLLM_FIELDS = ("repetition_penalty", "min_tokens", "ignore_eos")  # not the openai client's own


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _ask(client, prompt: list[int], **options):
    """A greedy completion with these options; its new token ids (through logprobs)."""
    extra = {k: options.pop(k) for k in VLLM_FIELDS if k in options}
    if "logit_bias" in options:
        options["logit_bias"] = {str(t): b for t, b in options["logit_bias"].items()}
    got = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0,
        extra_body=extra, **options,
    )  # fmt: skip
    return got.choices[0]


def test_concurrent_requests_with_options_equal_the_reference_loop(client, demo_model,
                                                                   demo_reference):  # fmt: skip
    tok = demo_model.tokenizer
    ids_of = {tok.token_text(i): i for i in range(demo_model.config.vocab_size)}
    prompt = demo_model.encode(PROMPT)
    want = [reference_loop(demo_reference, prompt, NEW, **dict(o)) for o in OPTIONS]
    plain = reference_loop(demo_reference, prompt, NEW)
    assert all(w != plain for w in want)  # every option changes the greedy run
    with ThreadPoolExecutor(len(OPTIONS)) as pool:  # they share the running batch
        choices = list(pool.map(lambda o: _ask(client, prompt, **dict(o)), OPTIONS))
    got = [[ids_of[t] for t in c.logprobs.tokens] for c in choices]
    assert got == want
    assert choices[5].finish_reason == "stop" and len(got[5]) == 5 and got[5][-1] == EOS
    assert choices[6].finish_reason == "length" and EOS in got[6]


def test_n_choices_are_independent_and_a_seed_repeats_them(client, demo_model):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=21)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    # choice j samples with seed + j: each is the local model's own run with that seed
    local = [demo_model.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=21 + j).text
             for j in range(3)]  # fmt: skip
    assert texts == local
    assert first.usage.prompt_tokens == len(demo_model.encode(PROMPT))
    assert first.usage.completion_tokens == 30


def test_n_choices_of_several_prompts_and_of_a_chat_stream(client, demo_model):
    prompts = ["Hello", "offload"]
    got = client.completions.create(
        model=MODEL_NAME, prompt=prompts, max_tokens=5, temperature=0.8, n=2, seed=3
    )
    by_index = sorted(got.choices, key=lambda c: c.index)
    for i, c in enumerate(by_index):  # choice p * n + j: prompt p, seed + j
        want = demo_model.generate(
            prompts[i // 2], max_new_tokens=5, temperature=0.8, seed=3 + i % 2
        )
        assert c.text == want.text
    messages = [{"role": "user", "content": "Hi"}]
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0.9, n=2, seed=5,
        stream=True,
    )  # fmt: skip
    texts = ["", ""]
    reasons = [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0.9, n=2, seed=5
    )
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == ["length", "length"] and texts[0] != texts[1]


def test_python_client_takes_the_options_as_the_local_model_does(live, demo_model):
    with offload_rt.connect(live.url) as remote:
        for options in OPTIONS:
            kw = dict(max_new_tokens=NEW, **options)
            assert remote.generate(PROMPT, **kw) == demo_model.generate(PROMPT, **kw)
        with pytest.raises(InvalidRequest, match="min_tokens"):
            remote.generate(PROMPT, max_new_tokens=3, min_tokens=4)
