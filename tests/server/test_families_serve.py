"""Tier 4 over the families: `offload-rt serve`'s app in front of each non-Mixtral demo
checkpoint, with continuous batching and a capped cache; the openai client's answers equal
the local model's own `generate`, and concurrent requests get their solo tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import offload_rt
from offload_rt.demo import make_demo_checkpoint
from offload_rt.engine.scheduler import SchedulerConfig
from offload_rt.server import ServerConfig
from tests.server.live import LiveServer

PROMPTS = ["Hello", "The quick brown fox", "offload", "Qwen runs on one small GPU"]


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss"])
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
