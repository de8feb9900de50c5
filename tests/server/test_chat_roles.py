"""Chat messages beyond system/user/assistant: developer and tool messages and an assistant's
tool_calls reach the chat template as transformers passes them (a call's JSON arguments as a
mapping); the template renders them, or refuses them with a 400."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

import offload_rt
from offload_rt.server import ServerConfig
from offload_rt.server.chat import TEMPLATE_FILE, ChatTemplate
from offload_rt.server.schemas import ChatRequest
from tests.server.conftest import MODEL_NAME
from tests.server.live import LiveServer

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<call {{ c.id }}>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{% if m.tool_call_id %} [answers {{ m.tool_call_id }}]{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "developer", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "now"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
]  # fmt: skip
RENDERED = (
    "<|developer|>Answer briefly.\n"
    "<|user|>Weather in Paris?\n"
    '<|assistant|><call call_1>weather({"city": "Paris", "days": 2})</call>'
    '<call call_2>clock("now")</call>\n'
    "<|tool|>sunny [answers call_1]\n"
    "<|tool|>noon [answers call_2]\n"
    "<|assistant|>"
)


def test_developer_tool_and_tool_calls_reach_the_template():
    body = ChatRequest.model_validate({"messages": MESSAGES})
    rendered = ChatTemplate(TEMPLATE, {}).render([m.as_template_input() for m in body.messages])
    assert rendered == RENDERED


@pytest.mark.parametrize(
    "message, fragment",
    [
        ({"role": "user"}, "user messages need content"),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": []}, "tool_calls belong to assistant"),
        ({"role": "assistant", "tool_calls": []}, "assistant messages need content"),
        ({"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
         "arguments"),
        ({"role": "assistant", "tool_calls": [{"id": "a", "type": "code", "function": {
            "name": "f", "arguments": "{}"}}]}, "type"),
    ],
)  # fmt: skip
def test_malformed_messages_are_refused(message, fragment):
    with pytest.raises(ValueError, match=fragment):
        ChatRequest.model_validate({"messages": [message]})


@pytest.fixture(scope="module")
def tool_server(demo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "demo"
    shutil.copytree(demo_dir, folder)
    (folder / TEMPLATE_FILE).write_text(TEMPLATE)  # wins over tokenizer_config.json's
    with offload_rt.load(folder, cache_experts=16) as model:
        with LiveServer(model, ServerConfig(served_model_name=MODEL_NAME)) as server:
            yield server, model


def test_the_server_renders_them_through_the_openai_client(tool_server):
    server, model = tool_server
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        got = client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=3, temperature=0
        )
    prompt = model.tokenizer.encode(RENDERED, add_special_tokens=False)
    assert got.usage.prompt_tokens == len(prompt)
    assert got.choices[0].message.content == model.generate(prompt, max_new_tokens=3).text


def test_a_template_that_cannot_render_them_is_a_400(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES[:2], "max_tokens": 2})
        assert r.status_code == 400 and "chat template refused" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES[1:2], "max_tokens": 2})
        assert r.status_code == 200
