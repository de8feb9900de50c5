"""The Ray expert backend: each MoE layer's groups go to the actors that hold their experts.

Per layer call: one request per actor holding a needed expert, carrying all of its tokens;
every request in flight before the first result is awaited; every `ray.get` bounded by a
timeout. A failed call (actor died, restarting, or timed out) is retried once the cluster has
recovered — the actor restarted by Ray, or its experts placed on the survivors — which is safe
because expert calls hold no state. Outputs are summed by the MoE block in ascending expert
order whatever order they arrive in, so float32 results equal the local backend's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from offload_rt.distributed.cluster import ExpertCluster, actor_failures
from offload_rt.distributed.wire import decode_response, encode_groups
from offload_rt.model.moe import ExpertKey


class ExpertCallError(RuntimeError):
    """A layer call that failed on every attempt; names the layer and experts."""


class RayExpertBackend:
    def __init__(self, cluster: ExpertCluster) -> None:
        self.cluster = cluster
        self.retries = 0

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        todo = {k: x for k, x in groups.items()}
        device = next(iter(groups.values())).device if groups else torch.device("cpu")
        out: dict[ExpertKey, torch.Tensor] = {}
        for _ in range(self.cluster.opts.max_attempts):
            calls = self._send(todo)
            failed = []
            for actor, (keys, ref) in calls.items():
                try:
                    payload = _get(ref, self.cluster.opts.call_timeout_s)
                except actor_failures():
                    failed.append(actor)
                    continue
                for key, y in decode_response(payload).groups().items():
                    out[key] = y.to(device)
                for key in keys:
                    del todo[key]
            if not todo:
                return out
            self.retries += 1
            self.cluster.recover(failed)
        names = ", ".join(str(k) for k in sorted(todo))
        raise ExpertCallError(
            f"{names}: no answer after {self.cluster.opts.max_attempts} attempts "
            f"(actors restarted or replaced in between)"
        )

    def _send(self, todo: Mapping[ExpertKey, torch.Tensor]) -> dict[int, tuple[list, object]]:
        """One request per actor, all submitted before any is awaited."""
        calls = {}
        for actor, keys in sorted(self.cluster.plan.group_by_actor(todo).items()):
            request = encode_groups("request", {k: todo[k] for k in keys})
            calls[actor] = (keys, self.cluster.handles[actor].run.remote(request))
        return calls

    def stats(self) -> dict[str, int]:
        return {**self.cluster.stats(), "retries": self.retries}

    def close(self) -> None:
        self.cluster.close()


def _get(ref: object, timeout_s: float) -> bytes:
    import ray

    return ray.get(ref, timeout=timeout_s)
