"""Fixtures of the service tests: the demo checkpoint (it has a tokenizer and a chat
template), loaded once, and a live server in front of it."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.demo import make_demo_checkpoint
from offload_rt.engine.scheduler import SchedulerConfig
from offload_rt.server import ServerConfig
from tests.server.live import LiveServer

MODEL_NAME = "demo"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    return make_demo_checkpoint(tmp_path_factory.mktemp("serve") / "demo")


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    with offload_rt.load(demo_dir, cache_experts=16) as m:
        yield m


@pytest.fixture(scope="module")
def live(demo_model):
    config = ServerConfig(served_model_name=MODEL_NAME, scheduler=SchedulerConfig(max_batch=8))
    with LiveServer(demo_model, config) as server:
        yield server


@pytest.fixture(scope="session")
def demo_reference(demo_dir):
    """The demo checkpoint as the transformers reference reads it, in float32."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
