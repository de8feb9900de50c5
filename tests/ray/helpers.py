"""Helpers of the Ray tests: the local reference outputs, fault injection, clean-up."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

import offload_rt
from offload_rt.distributed.cluster import NAMESPACE, RayOptions

ray = pytest.importorskip("ray")

PROMPTS = [[1, 17, 42, 99, 5, 63, 88, 12], [1, 11, 60], [1, 90, 14, 27, 71]]
NEW = 16
FAST_RECOVERY = RayOptions(call_timeout_s=30, restart_timeout_s=10, start_timeout_s=120)
# for a killed actor that Ray restarts: on a loaded 2-core machine a restart (a new process
# importing torch and opening the checkpoint) took over 10 s, and the runtime then rightly
# gave the actor up and placed its experts elsewhere, which is not what those tests test
RESTARTS = RayOptions(call_timeout_s=30, restart_timeout_s=120, start_timeout_s=120)


def ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def shut_down_and_check() -> None:
    ray.shutdown()
    deadline = time.monotonic() + 20
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes(), "Ray processes outlived the tests"


def start_cluster():
    """Head + 2 workers, one CPU and one custom resource each; the driver connected."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
    workers = [c.add_node(num_cpus=1, resources={f"node{i}": 1}) for i in (1, 2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE)
    return c, workers


def local_outputs_of(folder) -> dict:
    with offload_rt.load(folder) as m:
        return {
            "logits": m.logits(PROMPTS[0]),
            "single": m.generate(PROMPTS[0], max_new_tokens=NEW).token_ids,
            "batch": [r.token_ids for r in m.generate(PROMPTS, max_new_tokens=NEW)],
        }


def assert_same_as_local(model, local_outputs) -> None:
    assert torch.equal(model.logits(PROMPTS[0]), local_outputs["logits"])
    assert model.generate(PROMPTS[0], max_new_tokens=NEW).token_ids == local_outputs["single"]
    batch = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW)]
    assert batch == local_outputs["batch"]


def actor_infos(model) -> dict[int, dict]:
    handles = model.backend.cluster.handles
    return {i: ray.get(h.info.remote(), timeout=30) for i, h in handles.items()}


def fault_at_call(model, n: int, fault) -> list[int]:
    """Run `fault()` just before the backend's n-th layer call; returns a list that records
    the call numbers at which it ran."""
    backend, run, fired = model.backend, model.backend.run, []

    def counting_run(groups):
        counting_run.calls += 1
        if counting_run.calls == n:
            fault()
            fired.append(n)
        return run(groups)

    counting_run.calls = 0
    backend.run = counting_run
    return fired
