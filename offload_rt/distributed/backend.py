"""The Ray expert backend: each MoE layer's groups go to the actors that hold their experts.

Per layer call: one request per actor holding a needed expert, carrying all of its tokens;
every request in flight before the results are awaited, all with one `ray.get` bounded by a
timeout. A request travels as `bytes` frames (`wire.Packed.frames`), each under Ray's inline
limit, so it rides in the call's RPC rather than through the object store, and Ray passes it
without pickling; the response comes back in as many frames. A failed call (actor died,
restarting, or timed out) is retried once the cluster has recovered — the actor restarted by
Ray, or its experts placed on the survivors — which is safe because expert calls hold no
state. Outputs are summed by the MoE block in ascending expert order whatever order they
arrive in, so float32 results equal the local backend's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from offload_rt.distributed.cluster import ExpertCluster, RayOptions, actor_failures
from offload_rt.distributed.frames import decode_groups, encode_groups, pack_groups
from offload_rt.distributed.graph import GraphCallError, LayerGraph
from offload_rt.model.moe import ExpertKey

log = logging.getLogger(__name__)


class ExpertCallError(RuntimeError):
    """A layer call that failed on every attempt; names the layer and experts."""


@dataclass(frozen=True)
class _Call:
    keys: list[ExpertKey]  # the experts the request carries
    refs: list  # one ObjectRef per response frame


class RayExpertBackend:
    def __init__(self, cluster: ExpertCluster) -> None:
        self.cluster = cluster
        self.retries = 0
        opts = cluster.opts
        self.graph = (
            LayerGraph(opts.graph_buffer_bytes, opts.call_timeout_s)
            if opts.compiled_graph
            else None
        )

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        device = next(iter(groups.values())).device if groups else torch.device("cpu")
        out = self._run_graph(groups) if self.graph is not None and groups else None
        if out is None:
            out = self._run_remote(groups)
        if device.type != "cpu":
            out = {k: y.to(device) for k, y in out.items()}
        return out

    def _run_graph(
        self, groups: Mapping[ExpertKey, torch.Tensor]
    ) -> dict[ExpertKey, torch.Tensor] | None:
        """The layer through the compiled graph; None where it does not apply or failed (the
        cluster then recovered, the graph to be compiled again on a later call)."""
        if not self.graph.ready(self.cluster.handles):
            return None
        by_actor = self.cluster.plan.group_by_actor(groups)
        requests = {
            a: encode_groups("request", {k: groups[k] for k in ks}) for a, ks in by_actor.items()
        }
        if not self.graph.fits(requests):
            return None
        try:
            responses = self.graph.call(requests)
        except GraphCallError as e:
            log.warning("%s; recovering, then the layer again through .remote()", e)
            self.retries += 1
            self.cluster.recover(self.cluster.suspects(e.__cause__))
            return None
        out: dict[ExpertKey, torch.Tensor] = {}
        for response in responses.values():
            out.update(decode_groups("response", [response]))
        return out

    def _run_remote(
        self, groups: Mapping[ExpertKey, torch.Tensor]
    ) -> dict[ExpertKey, torch.Tensor]:
        """The layer as `.remote()` calls, retried across recoveries."""
        todo = dict(groups)
        out: dict[ExpertKey, torch.Tensor] = {}
        for _ in range(self.cluster.opts.max_attempts):
            calls = self._send(todo)
            failed = []
            for actor, frames in _receive(calls, self.cluster.opts.call_timeout_s).items():
                if frames is None:
                    failed.append(actor)
                    continue
                out.update(decode_groups("response", frames))
                for key in calls[actor].keys:
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

    def _send(self, todo: Mapping[ExpertKey, torch.Tensor]) -> dict[int, _Call]:
        """One request per actor, all submitted before any is awaited."""
        calls = {}
        for actor, keys in sorted(self.cluster.plan.group_by_actor(todo).items()):
            packed = pack_groups("request", {k: todo[k] for k in keys})
            frames = packed.frames(frame_count(packed.nbytes, self.cluster.opts))
            method = self.cluster.handles[actor].run
            if len(frames) == 1:
                calls[actor] = _Call(keys, [method.remote(frames[0])])
            else:
                calls[actor] = _Call(keys, method.options(num_returns=len(frames)).remote(*frames))
        return calls

    def stats(self) -> dict[str, int]:
        compiled = self.graph.stats() if self.graph is not None else {}
        return {**self.cluster.stats(), "retries": self.retries, **compiled}

    def close(self) -> None:
        if self.graph is not None:
            self.graph.teardown()  # the actors' graph loops stop before the actors die
        self.cluster.close()


def frame_count(nbytes: int, opts: RayOptions) -> int:
    """Frames of a message of `nbytes`: enough to keep each under `opts.frame_bytes`, or one
    (through the object store) above `opts.inline_bytes`."""
    if nbytes > opts.inline_bytes:
        return 1
    return max(1, -(-nbytes // opts.frame_bytes))


def _receive(calls: Mapping[int, _Call], timeout_s: float) -> dict[int, list[bytes] | None]:
    """Each actor's response frames, or None where its call failed or ran out of time. One
    `ray.get` for all while nothing fails; then each actor's apart, within the same deadline."""
    import ray

    deadline = time.monotonic() + timeout_s
    refs = [ref for call in calls.values() for ref in call.refs]
    try:
        values = ray.get(refs, timeout=timeout_s)
    except actor_failures():
        return {actor: _frames_or_none(call, deadline) for actor, call in calls.items()}
    out, start = {}, 0
    for actor, call in calls.items():
        out[actor] = values[start : start + len(call.refs)]
        start += len(call.refs)
    return out


def _frames_or_none(call: _Call, deadline: float) -> list[bytes] | None:
    import ray

    try:
        return ray.get(call.refs, timeout=max(deadline - time.monotonic(), 0))
    except actor_failures():
        return None
