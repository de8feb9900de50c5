"""Tier 3 over the family registry: every family's experts in Ray actors give the transformers
reference's logits and greedy tokens; one of them (shared experts, grouped routing) survives an
actor killed mid-generation, as Mixtral does in test_cluster and test_local: the restart is the
same for every family. One local Ray for the module."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from tests.families import REFERENCES, save_family
from tests.ray.helpers import RESTARTS, fault_at_call
from tests.test_exactness import PROMPTS, reference_greedy

ray = pytest.importorskip("ray")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, namespace="offload_rt", include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("family", sorted(REFERENCES))
def test_family_on_ray_matches_transformers(ray_session, tmp_path, family):
    # the fused layout for one family, the hub's for the others: both reach the actors
    hf = save_family(family, tmp_path, fused=family == "qwen3_moe")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPTS[0]])).logits[0]
    tokens = [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS[:2]]
    with offload_rt.load(tmp_path, backend="ray", ray_options=RESTARTS) as model:
        assert (model.logits(PROMPTS[0]) - want).abs().max().item() <= 1e-4
        got = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=NEW_TOKENS)]
        assert got == tokens
        if family != "deepseek_v3":
            return
        # an actor killed before the 5th layer call: Ray restarts it, the call is retried
        handle = next(iter(model.backend.cluster.handles.values()))
        fired = fault_at_call(model, 5, lambda: ray.kill(handle, no_restart=False))
        again = [r.token_ids for r in model.generate(PROMPTS[:2], max_new_tokens=NEW_TOKENS)]
        assert fired == [5] and again == tokens


def test_plan_prints_each_actor(ray_session, reference, capsys):
    """`offload-rt plan` as the command runs it (its main, in this process: it joins the
    module's Ray rather than starting one)."""
    from offload_rt.cli import main

    assert main(["plan", str(reference[0]), "--expert-actors", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 experts (2 MoE layers (layers 0-1) x 8 experts)" in out
    assert "expert-0" in out and "expert-1" in out
    assert ray.is_initialized()  # the module's Ray, left running
