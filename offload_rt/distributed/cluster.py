"""The expert actors of one model on a Ray cluster: join Ray, plan, spawn, recover, remove.

Actors are named `expert-{i}` in the Ray namespace `offload_rt` (visible in `ray list actors`
and the dashboard), pinned to their planned node with a hard node-affinity strategy, and
restarted by Ray up to `max_restarts` times. When an actor cannot come back (its node is gone),
its experts are placed again on the survivors (`placement.replan`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from offload_rt.distributed.actor import ActorSpec, ExpertActor
from offload_rt.distributed.placement import (
    DEFAULT_GPU_MEMORY_BYTES,
    DEFAULT_HOST_FRACTION,
    ActorPlan,
    PlacementPlan,
    nodes_from_ray,
    plan_placement,
    replan,
)
from offload_rt.grid import ExpertGrid

NAMESPACE = "offload_rt"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start (or join) a local Ray; "auto": running cluster
    expert_actors: int | None = None  # None: one per GPU, or one per node without GPUs
    call_timeout_s: float = 60.0  # one actor call of one layer
    start_timeout_s: float = 300.0  # actors' start, checkpoint opening included
    restart_timeout_s: float = 60.0  # wait for a restarted actor before placing its experts again
    max_restarts: int = 3  # Ray restarts of one actor before it counts as gone
    max_attempts: int = 4  # tries of one layer call across restarts and re-placements
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY_BYTES  # per GPU, usable for expert slots
    host_fraction: float = DEFAULT_HOST_FRACTION  # share of a node's Ray memory for experts
    host_experts: int | None = None  # packed experts in pinned RAM per GPU actor; None: as planned
    namespace: str = NAMESPACE  # Ray namespace of the actors; one model per namespace
    # a layer request is cut into `bytes` frames of at most this many bytes, each passed as one
    # Ray argument (the response likewise): under Ray's max_direct_call_object_size (100 KiB by
    # default) a frame rides in the call's RPC; a larger object goes through the object store,
    # which costs several milliseconds a trip
    frame_bytes: int = 96 * 1024
    # requests above this go whole, as one object through the object store: Ray inlines at most
    # task_rpc_inlined_bytes_limit (10 MiB by default) of one call's arguments anyway
    inline_bytes: int = 8 * 2**20
    # layer calls through one Ray Compiled Graph over all actors (`distributed/graph.py`),
    # falling back to `.remote()` calls where it cannot. Off by default: on the 3-node test
    # cluster it was not reliably faster than `.remote()` (docs/benchmarks.md, "Ray backend")
    compiled_graph: bool = False
    # the graph's channel size: a layer call with a larger request goes `.remote()`
    graph_buffer_bytes: int = 2**20


class ExpertCluster:
    """Live actors by plan index; the plan changes when actors are gone for good."""

    def __init__(
        self,
        plan: PlacementPlan,
        handles: dict[int, object],
        specs: dict[int, ActorSpec],
        opts: RayOptions,
    ) -> None:
        self.plan = plan
        self.handles = handles
        self.specs = specs  # per actor index: what Ray restarts it with
        self.opts = opts
        self.replans = 0
        self.recoveries = 0

    @classmethod
    def start(
        cls,
        checkpoint: str,
        grid: ExpertGrid,
        expert_bytes: int,
        dtype: str,
        opts: RayOptions,
    ) -> ExpertCluster:
        plan = plan_for_cluster(grid, expert_bytes, opts)
        specs = {a.index: _spec(a, checkpoint, dtype, opts) for a in plan.actors}
        handles: dict[int, object] = {}
        cluster = cls(plan, handles, specs, opts)
        try:
            for a in plan.actors:
                handles[a.index] = _spawn(a, specs[a.index], opts)
            _wait_ready(list(handles.values()), opts.start_timeout_s)
        except Exception:
            cluster.close()
            raise
        return cluster

    def recover(self, failed: list[int]) -> None:
        """After calls to `failed` actors failed: wait for those Ray restarts; place the experts
        of the ones that do not come back on the survivors."""
        gone = [i for i in failed if not self._back(i)]
        self.recoveries += len(failed) - len(gone)
        if gone:
            self.remove(gone)

    def suspects(self, error: BaseException | None) -> list[int]:
        """After a call that spanned every actor failed: the actor the error names (it may be
        back already, restarted) and those failing a ping (dead, restarting, or silent for the
        call timeout)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        named = error.actor_id if isinstance(error, RayActorError) else None
        failed = [i for i, h in self.handles.items() if named and h._actor_id.hex() == named]
        refs = {i: h.ping.remote() for i, h in self.handles.items() if i not in failed}
        for i, ref in refs.items():
            try:
                ray.get(ref, timeout=self.opts.call_timeout_s)
            except (*actor_failures(), ActorUnavailableError):
                failed.append(i)
        return sorted(failed)

    def _back(self, i: int) -> bool:
        """Whether actor i answers again within the restart timeout."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + self.opts.restart_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                return ray.get(self.handles[i].ping.remote(), timeout=left)
            except ActorUnavailableError:  # restarting: ask again
                time.sleep(0.1)
            except actor_failures():  # dead for good, or its node is
                return False
        return False

    def remove(self, gone: list[int]) -> None:
        import ray

        survivors = [a.index for a in self.plan.actors if a.index not in gone]
        self.plan = replan(self.plan, survivors)  # raises PlacementError naming an expert
        self.replans += 1
        for i in gone:
            ray.kill(self.handles.pop(i), no_restart=True)

    def stats(self) -> dict[str, int]:
        import ray

        totals: dict[str, int] = {}
        per_actor = ray.get(
            [h.stats.remote() for h in self.handles.values()], timeout=self.opts.call_timeout_s
        )
        for s in per_actor:
            for k, v in s.items():
                totals[k] = totals.get(k, 0) + v
        return {
            **totals,
            "actors": len(self.handles),
            "recoveries": self.recoveries,
            "replans": self.replans,
        }

    def close(self) -> None:
        import ray

        for h in self.handles.values():
            ray.kill(h, no_restart=True)
        ours = [a.name for a in self.plan.actors if a.index in self.handles]
        _wait_names_free(ours, self.opts.namespace)
        self.handles.clear()


def plan_for_cluster(grid: ExpertGrid, expert_bytes: int, opts: RayOptions) -> PlacementPlan:
    """The placement of every expert over the nodes of the Ray this process is connected to."""
    import ray

    nodes = nodes_from_ray(ray.nodes(), opts.gpu_memory_bytes, opts.host_fraction)
    return plan_placement(nodes, grid, expert_bytes, opts.expert_actors)


def actor_failures() -> tuple[type[Exception], ...]:
    """What a call to an actor raises when the actor, its node or the call's time is gone."""
    from ray.exceptions import ActorUnschedulableError, GetTimeoutError, RayActorError

    return (RayActorError, ActorUnschedulableError, GetTimeoutError)


def _spec(a: ActorPlan, checkpoint: str, dtype: str, opts: RayOptions) -> ActorSpec:
    return ActorSpec(
        checkpoint=checkpoint,
        device=a.device,
        dtype=dtype,
        device_slots=max(1, a.device_slots),
        # the planner budgets host RAM for the experts beyond the device slots, no more
        host_experts=opts.host_experts if opts.host_experts is not None else a.host_slots,
        threads=1,
    )


def _spawn(a: ActorPlan, spec: ActorSpec, opts: RayOptions):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _name_taken(a.name, opts.namespace):
        raise RuntimeError(
            f"an actor named {a.name!r} already runs in Ray namespace {opts.namespace!r}: "
            "another offload_rt model holds this cluster's experts; close it, or give this "
            "model another namespace (RayOptions.namespace)"
        )
    return (
        ray.remote(ExpertActor)
        .options(
            name=a.name,
            namespace=opts.namespace,
            num_cpus=spec.threads,
            num_gpus=1 if a.device == "cuda" else 0,
            max_restarts=opts.max_restarts,
            scheduling_strategy=NodeAffinitySchedulingStrategy(a.node_id, soft=False),
        )
        .remote(spec)
    )


def _wait_ready(handles: list[object], timeout_s: float) -> None:
    """Every actor answering (its checkpoint opened), with a progress bar on a terminal; an
    actor that failed to start raises its error here."""
    import ray
    from tqdm import tqdm

    pending = [h.ping.remote() for h in handles]  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    with tqdm(total=len(pending), desc="expert actors ready", unit="actor", disable=None) as bar:
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
            if not ready:
                raise ray.exceptions.GetTimeoutError(
                    f"{len(pending)} of {len(handles)} expert actors not ready after {timeout_s} s"
                )
            ray.get(ready, timeout=max(left, 1))
            bar.update(len(ready))


def _wait_names_free(names: list[str], namespace: str, timeout_s: float = 30.0) -> None:
    """ray.kill returns before the name is released; a new model may want the names at once."""

    deadline = time.monotonic() + timeout_s
    for name in names:
        while _name_taken(name, namespace) and time.monotonic() < deadline:
            time.sleep(0.05)


def _name_taken(name: str, namespace: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def join_ray(address: str | None) -> bool:
    """Connect this process to Ray: a running local instance or a new one (None), the running
    cluster ("auto"), or an address. True when this call connected, so closing the model
    disconnects (and, for a Ray it started, stops it); False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING")
    return True
