"""Tier 3: the Ray backend on a local Ray, a node removed for good mid-generation, and a
cluster with no room for an expert."""

from __future__ import annotations

import pytest

import offload_rt
from offload_rt.distributed.backend import frame_count
from offload_rt.distributed.cluster import RayOptions
from offload_rt.distributed.placement import PlacementError
from tests.ray.helpers import (
    FAST_RECOVERY,
    NEW,
    PROMPTS,
    assert_same_as_local,
    fault_at_call,
    ray,
    start_cluster,
)


def test_removing_a_node_mid_generation_changes_no_token(reference, local_outputs):
    # the default remote calls here (a new plan without the node); the compiled graph meets its
    # fault, an actor killed, in test_cluster: each path and each fault once
    c, workers = start_cluster()
    opts = FAST_RECOVERY  # compiled_graph=False, the default
    try:
        with offload_rt.load(reference[0], backend="ray", ray_options=opts) as m:
            doomed = workers[0].node_id
            on_doomed = [a for a in m.backend.cluster.plan.actors if a.node_id == doomed]
            assert len(on_doomed) == 1
            fired = fault_at_call(m, 7, lambda: c.remove_node(workers[0]))
            tokens = [r.token_ids for r in m.generate(PROMPTS, max_new_tokens=NEW)]
            assert fired == [7]
            assert tokens == local_outputs["batch"]
            plan = m.backend.cluster.plan
            assert len(plan.actors) == 2 and doomed not in {a.node_id for a in plan.actors}
            placed = sorted(k for a in plan.actors for k in a.experts)
            assert len(placed) == 16 and len(set(placed)) == 16  # every expert placed once
            stats = m.stats()
            assert stats["replans"] == 1
            assert m.generate(PROMPTS[0], max_new_tokens=NEW).token_ids == local_outputs["single"]
    finally:
        ray.shutdown()
        c.shutdown()


def test_local_ray_matches_local_backend(reference, local_outputs):
    # None: start a local Ray; the model stops it again on close. Frames of 300 bytes: a
    # token's hidden state (64 float32) is 256, so requests and responses go in several frames
    small_frames = RayOptions(frame_bytes=300)
    assert frame_count(2 * 64 * 4 + 50, small_frames) == 2
    with offload_rt.load(
        reference[0], backend="ray", expert_actors=2, ray_options=small_frames
    ) as m:
        assert ray.is_initialized()
        assert len(m.backend.cluster.plan.actors) == 2
        assert_same_as_local(m, local_outputs)
    assert not ray.is_initialized()


def test_no_room_names_the_expert(reference):
    tiny = RayOptions(host_fraction=1e-9)
    with pytest.raises(PlacementError, match=r"layer \d+ expert \d+"):
        offload_rt.load(reference[0], backend="ray", ray_options=tiny)
    assert not ray.is_initialized()  # a failed load disconnects what it connected


def test_local_only_options_are_refused_for_ray(reference):
    for kwargs in ({"cache_experts": 4}, {"link_gbps": 16.0}):
        with pytest.raises(ValueError, match="apply to the local backend"):
            offload_rt.load(reference[0], backend="ray", **kwargs)
    assert not ray.is_initialized()
