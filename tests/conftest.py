"""Shared fixtures: random Mixtral checkpoints written by the transformers reference.

transformers is a test-only dependency: it writes the checkpoints (in the classic per-expert
layout of the real Mixtral releases) and is the reference for the model math.
"""

from __future__ import annotations

import os

# MKL may otherwise pick fewer threads than asked for when the machine is busy, which changes
# the order of its sums: one kernel at two loads would not give bit-identical results. Set
# before torch loads MKL; Ray workers started by the tests inherit it.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
# Ray runs its workers (the expert actors) at niceness 15 by default: beside two CPU-bound
# processes at 0 they got a few percent of a core, and layer calls ran into their timeouts.
# Every Ray the tests start (ray.init, Cluster, `ray start`, the CLI) inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")

import random  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import offload_rt
from offload_rt.demo import make_demo_checkpoint

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    # larger than the default 0.02 so that logits are spread and greedy choices are not near-ties
    initializer_range=0.1,
)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from generators seeded by its own name: a test that draws from the
    global generators gets the same inputs on every run, alone or in any order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread, for the modules whose subject is not threads (caches, links,
    placements, prefetch on tiny models). With more OpenMP threads than free cores libgomp
    stops spinning at its barriers, so on a busy machine each parallel region of two threads
    waits for a descheduled worker: those tests ran 10-40x slower beside two CPU burners
    (test_compute_on_miss 4.7 s against 0.6, the simulated link 12 s against 0.3). The
    kernels' thread splits keep their own tests (test_rowlayer, test_cpukernels, ...). Module
    scoped, before the module's own fixtures: results computed once in a module (references)
    come from the same thread count as its tests' (MKL's sums differ between counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_reference(folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a random transformers Mixtral to `folder`; returns the reference model (eval)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY, **overrides})).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(folder with one model.safetensors, the transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    return folder, save_reference(folder)


@pytest.fixture(scope="session")
def sharded_reference(tmp_path_factory):
    """(folder with shards and model.safetensors.index.json, the transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-mixtral-sharded")
    model = save_reference(folder, seed=1, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model


@pytest.fixture(scope="module")
def model(reference):
    """The reference checkpoint loaded with 6 of its 16 experts on the device."""
    with offload_rt.load(reference[0], cache_experts=6) as m:
        yield m


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo checkpoint (a tokenizer and a chat template), every expert resident."""
    folder = make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo")
    with offload_rt.load(folder) as m:
        yield m
