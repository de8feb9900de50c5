"""Tier 4: the real `openai` package against `offload-rt serve`'s app on a live port; every
answer is checked against the local model's own `generate`."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from offload_rt.server import ServerConfig
from offload_rt.server.chat import ChatTemplate
from tests.server.conftest import MODEL_NAME
from tests.server.live import LiveServer

PROMPTS = ["Hello", "The quick brown fox", "offload", "Mixtral runs on one small GPU"]


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_greedy_completion_text_equals_local_generate(client, demo_model):
    for prompt in PROMPTS:
        want = demo_model.generate(prompt, max_new_tokens=12)
        got = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0
        )
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason == "length"
        assert got.usage.completion_tokens == 12
        assert got.usage.prompt_tokens == want.prompt_tokens


def test_seeded_sampling_and_stop_strings_match_local(client, demo_model):
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=11)
    sampled = demo_model.generate("Hello", **kw)
    got = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=20, temperature=0.9, top_p=0.95, seed=11
    )
    assert got.choices[0].text == sampled.text
    stop = sampled.text[5:8]
    want = demo_model.generate("Hello", stop=stop, **kw)
    got = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=20, temperature=0.9, top_p=0.95, seed=11,
        stop=[stop],
    )  # fmt: skip
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"


def test_a_list_of_prompts_gives_one_choice_each_in_order(client, demo_model):
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=6, temperature=0)
    want = [r.text for r in demo_model.generate(PROMPTS, max_new_tokens=6)]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want


def _chat_prompt(demo_model, messages) -> list[int]:
    text = ChatTemplate.from_folder(demo_model.checkpoint.folder).render(messages)
    assert text.startswith("<s>[INST] ")  # Mixtral's template, as the demo ships it
    return demo_model.tokenizer.encode(text, add_special_tokens=False)


def test_streamed_chat_completion_equals_local_generate(client, demo_model):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me about experts."},
    ]
    want = demo_model.generate(_chat_prompt(demo_model, messages), max_new_tokens=15)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15


def test_chat_without_streaming_and_a_refused_conversation(client, demo_model):
    messages = [{"role": "user", "content": "Hi"}]
    want = demo_model.generate(_chat_prompt(demo_model, messages), max_new_tokens=8)
    got = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0
    )
    assert got.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "assistant", "content": "x"}], max_tokens=2
        )


def test_an_api_key_is_required_when_set(demo_model):
    config = ServerConfig(api_key="s3cret", served_model_name=MODEL_NAME)
    with LiveServer(demo_model, config) as server:
        url = server.url + "/v1"
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as c:
            assert [m.id for m in c.models.list()] == [MODEL_NAME]
        assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_a_client_that_disconnects_has_its_request_cancelled(live):
    sched = live.scheduler
    before = sched.stats.cancelled
    body = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
    done = threading.Event()
    for _ in range(200):  # the scheduler drops it at its next step boundary
        if sched.stats.cancelled > before and sched.running() == 0:
            done.set()
            break
        done.wait(0.05)
    assert done.is_set(), "the disconnected request kept its row"


def test_metrics_report_requests_tokens_queue_and_the_cache_hit_rate(live, client, demo_model):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = ("offload_rt_http_requests_total", (("path", "/v1/completions"), ("status", "200")))
    assert samples[ok] >= 1
    assert (
        samples[("offload_rt_generated_tokens_total", ())] == live.scheduler.stats.generated_tokens
    )
    assert samples[("offload_rt_queue_depth", ())] == 0
    stats = demo_model.stats()
    rate = samples[("offload_rt_expert_cache_hit_rate", ())]
    assert rate == pytest.approx(stats["hits"] / (stats["hits"] + stats["misses"]), abs=0.05)
    assert 0 < rate < 1  # the demo model runs with a capped cache: some hits, some misses


def test_a_non_streaming_client_that_goes_away_has_its_request_cancelled(live):
    sched = live.scheduler
    before = sched.stats.cancelled
    body = {"prompt": "Hello", "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(live.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    done = threading.Event()
    for _ in range(200):
        if sched.stats.cancelled > before and sched.running() == 0:
            done.set()
            break
        done.wait(0.05)
    assert done.is_set(), "the abandoned request kept its row"
