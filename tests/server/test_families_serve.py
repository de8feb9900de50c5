"""Tier 4 over the families: `offload-rt serve`'s app in front of each non-Mixtral demo
checkpoint, with continuous batching and a capped cache; the openai client's answers equal
the local model's own `generate`, concurrent requests get their solo tokens, and echoed
prompt log-probabilities equal the family's transformers reference's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import offload_rt
from offload_rt.demo import make_demo_checkpoint
from offload_rt.engine.scheduler import SchedulerConfig
from offload_rt.server import ServerConfig
from tests.server.live import LiveServer

PROMPTS = ["Hello", "The quick brown fox", "offload", "Qwen runs on one small GPU"]


@pytest.mark.parametrize(
    "family",
    ["qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss", "glm4_moe", "deepseek_v3", "deepseek_v2"],
)
def test_a_family_served_answers_as_it_generates(tmp_path, family):
    folder = make_demo_checkpoint(tmp_path / family, family=family)
    config = ServerConfig(served_model_name=family, scheduler=SchedulerConfig(max_batch=4))
    with offload_rt.load(folder, cache_experts=8) as model:
        want = [model.generate(p, max_new_tokens=8).text for p in PROMPTS]
        with LiveServer(model, config) as server:
            with openai.OpenAI(
                base_url=server.url + "/v1", api_key="unused", max_retries=0
            ) as client:

                def ask(prompt: str) -> str:
                    got = client.completions.create(
                        model=family, prompt=prompt, max_tokens=8, temperature=0
                    )
                    return got.choices[0].text

                with ThreadPoolExecutor(len(PROMPTS)) as pool:
                    assert list(pool.map(ask, PROMPTS)) == want
                scored = client.completions.create(
                    model=family, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=1
                )
        check_prompt_logprobs(folder, [model.encode(p) for p in PROMPTS], scored)


def check_prompt_logprobs(folder, prompts: list[list[int]], scored) -> None:
    """Echoed prompt log-probabilities equal the family's transformers reference's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for ids, choice in zip(prompts, sorted(scored.choices, key=lambda c: c.index)):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids)
        want = [ref[i, t].item() for i, t in enumerate(ids[1:])]
        assert max(abs(a - b) for a, b in zip(got[1:], want)) <= 1e-4


# the shape of GPT-OSS's harmony template (chat_template.jinja in the release): a system
# message with today's date, the developer's instructions, channels, tool calls as JSON, a
# namespace, loop controls and the generation tag that transformers' renderer adds
HARMONY = """{%- set ns = namespace(developer="") -%}
{%- for m in messages if m.role in ("system", "developer") -%}
{%- set ns.developer = ns.developer + m.content -%}
{%- endfor -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ reasoning_effort | default("medium") }}

# Valid channels: analysis, commentary, final.<|end|>
{%- if ns.developer %}<|start|>developer<|message|># Instructions

{{ ns.developer }}<|end|>{% endif -%}
{%- for m in messages -%}
{%- if m.role == "user" -%}<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == "assistant" -%}
{%- if m.tool_calls is defined -%}
{%- for call in m.tool_calls -%}
<|start|>assistant to=functions.{{ call.function.name }}<|channel|>commentary json<|message|>
{{- call.function.arguments | tojson }}<|call|>
{%- if loop.index >= 1 %}{% break %}{% endif -%}
{%- endfor -%}
{%- else -%}
{% generation %}<|start|>assistant<|channel|>final<|message|>
{{- m.content }}<|end|>{% endgeneration %}
{%- endif -%}
{%- elif m.role not in ("system", "developer") -%}
{{- raise_exception("unknown role " + m.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}"""


def test_gpt_oss_chat_template_from_its_jinja_file(tmp_path):
    """A chat_template.jinja beside the tokenizer wins over tokenizer_config.json's template
    and renders as transformers' apply_chat_template does; `serve` answers a chat with it."""
    import transformers

    from offload_rt.server.chat import ChatTemplate

    folder = make_demo_checkpoint(tmp_path / "oss", family="gpt_oss")
    (folder / "chat_template.jinja").write_text(HARMONY)
    messages = [
        {"role": "developer", "content": "Answer in French. «Toujours»."},
        {"role": "user", "content": "What is <b>MoE</b>?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "lookup", "arguments": {"q": "MoE é"}}}],
        },
        {"role": "user", "content": "And offloading?"},
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    got = ChatTemplate.from_folder(folder).render(messages)
    assert got == want and "functions.lookup" in got and '"MoE é"' in got
    # what the server's schema takes (its roles: system, user, assistant)
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is MoE?"},
        {"role": "assistant", "content": "Un mélange d'experts."},
        {"role": "user", "content": "And offloading?"},
    ]
    text = ChatTemplate.from_folder(folder).render(messages)
    assert text.endswith("<|start|>user<|message|>And offloading?<|end|><|start|>assistant")
    config = ServerConfig(served_model_name="oss", scheduler=SchedulerConfig(max_batch=2))
    with offload_rt.load(folder) as model:
        prompt = model.tokenizer.encode(text, add_special_tokens=False)
        local = model.generate(prompt, max_new_tokens=6).text
        with LiveServer(model, config) as server:
            with openai.OpenAI(
                base_url=server.url + "/v1", api_key="unused", max_retries=0
            ) as client:
                answer = client.chat.completions.create(
                    model="oss", messages=messages, max_tokens=6, temperature=0
                )
    assert answer.choices[0].message.content == local
