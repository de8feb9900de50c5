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


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe"])
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
