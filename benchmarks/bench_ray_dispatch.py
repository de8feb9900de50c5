"""Sections 2 and 3 of `bench_ray.py`: the dispatch overhead of one MoE layer against a bare
Ray round trip carrying the same frames, and Ray Compiled Graphs (see `bench_ray.py`'s
docstring for what each row measures)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from bench_ray_common import (
    DISPATCH_BATCHES,
    RAY_OPTIONS,
    WIDE,
    Options,
    interleaved,
    ray_get,
    scaled,
    spawn_echo,
    submit,
)
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import offload_rt
from offload_rt import ExpertKey
from offload_rt.distributed.actor import ActorSpec, ExpertActor
from offload_rt.distributed.backend import RayExpertBackend, frame_count
from offload_rt.distributed.frames import decode_groups, pack_groups
from offload_rt.distributed.placement import PlacementPlan
from offload_rt.model.moe import group_by_expert

# ---- 2. dispatch overhead


class TimedExpertActor(ExpertActor):
    """An expert actor that times each `run` and the expert compute inside it."""

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec)
        self.seconds: dict[str, list[float]] = {"run": [], "compute": []}
        self.compute = self.backend.run
        self.backend.run = self._timed(self.backend.run, "compute")
        self.request: dict[ExpertKey, torch.Tensor] | None = None

    def compute_only(self, *frames: bytes) -> bytes | tuple[bytes, ...]:
        """The request's expert compute, the request echoed: `run` less its decode and encode
        (the request is decoded on the first call only)."""
        if self.request is None:
            self.request = decode_groups("request", frames)
        with torch.inference_mode():
            self.compute(self.request)
        return frames[0] if len(frames) == 1 else frames

    def _timed(self, fn: Callable, name: str) -> Callable:
        def timed(*args: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name].append(time.perf_counter() - start)

        return timed

    def run(self, *frames: bytes) -> bytes | tuple[bytes, ...]:
        return self._timed(super().run, "run")(*frames)

    def medians_us(self) -> dict[str, float]:
        """Median µs of `run` and of its compute since the last call; starts afresh."""
        out = {k: statistics.median(v) * 1e6 if v else 0.0 for k, v in self.seconds.items()}
        self.seconds = {k: [] for k in self.seconds}
        return out


def spawn_twin(spec: ActorSpec, node_id: str) -> ActorHandle:
    """A TimedExpertActor with an expert actor's spec on its node (no CPU: they hold them)."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    remote = ray.remote(TimedExpertActor)
    handle = remote.options(num_cpus=0, scheduling_strategy=strategy).remote(spec)
    ray_get(handle.ping.remote())
    return handle


@dataclass(frozen=True)
class Dispatch:
    actors: list[int]  # expert actors the layer call goes to
    request_bytes: list[int]  # bytes of each actor's request
    frames: list[int]  # frames of each actor's request
    us: dict[str, float]  # median µs of each way of making the call (see `dispatch_ways`)
    compute_us: float  # in the actor with the most: its expert compute
    actor_wire_us: float  # in that actor: the rest of its `run` (decode, encode)
    encode_us: float  # driver, alone: group by actor, join, encode
    decode_us: float  # driver, alone: decode the responses into groups

    @property
    def gap_us(self) -> float:
        """backend.run above the bare trip, its compute left out."""
        return self.us["backend"] - self.compute_us - self.us["bare"]

    @property
    def contention_us(self) -> float:
        """What the compute adds to a round trip beyond its own time (CPU and caches taken
        from the Ray processes on the same cores): floor - bare - compute."""
        return self.us["floor"] - self.us["bare"] - self.compute_us

    def ratio(self, way: str) -> float:
        return (self.us[way] - self.compute_us) / self.us["bare"]


def layer_groups(plan: PlacementPlan, batch: int) -> dict[ExpertKey, torch.Tensor]:
    """Batch 1: one token to expert 0 and the first expert on another actor (as the MoE block's
    single-token path sends it). Otherwise a random top-2 routing of `batch` tokens."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, WIDE["hidden_size"], generator=g)  # (B, D)
    experts = range(WIDE["num_local_experts"])
    if batch == 1:
        first = plan.owner(ExpertKey(0, 0)).index
        other = next(e for e in experts if plan.owner(ExpertKey(0, e)).index != first)
        return {ExpertKey(0, 0): x, ExpertKey(0, other): x}
    logits = torch.randn(batch, len(experts), generator=g)
    weights, chosen = torch.topk(torch.softmax(logits, -1), WIDE["num_experts_per_tok"])
    routing = group_by_expert(0, weights, chosen)
    return {key: x[rows] for key, rows in zip(routing.keys, routing.rows)}


Frames = dict[int, list[bytes]]  # actor -> its request (or response) frames


def requests(plan: PlacementPlan, groups: Mapping[ExpertKey, torch.Tensor]) -> Frames:
    """The frames `RayExpertBackend._send` sends: one request per actor."""
    out = {}
    for actor, keys in sorted(plan.group_by_actor(groups).items()):
        packed = pack_groups("request", {k: groups[k] for k in keys})
        out[actor] = packed.frames(frame_count(packed.nbytes, RAY_OPTIONS))
    return out


def decode_all(responses: Frames) -> dict[ExpertKey, torch.Tensor]:
    out = {}
    for frames in responses.values():
        out.update(decode_groups("response", frames))
    return out


def calls_to(
    handles: Mapping[int, ActorHandle], method: str, payloads: Frames
) -> Callable[[], Frames]:
    """All calls in flight, then one ray.get of them all; the response frames by actor."""

    def call() -> Frames:
        refs = {i: submit(handles[i], method, frames) for i, frames in payloads.items()}
        values = iter(ray_get([r for rs in refs.values() for r in rs]))
        return {i: [next(values) for _ in rs] for i, rs in refs.items()}

    return call


def remote_only(backend: RayExpertBackend) -> RayExpertBackend:
    """A backend on the same cluster that makes every layer call with `.remote()` calls (the
    compiled graph stays compiled, its actors' loops waiting, as in the compiled backend)."""
    other = RayExpertBackend(backend.cluster)
    other.graph = None
    return other


def dispatch_ways(
    backend: RayExpertBackend,
    groups: dict[ExpertKey, torch.Tensor],
    payloads: Frames,
    echoes: dict[int, ActorHandle],
    twins: dict[int, ActorHandle],
) -> dict[str, Callable[[], object]]:
    whole = {i: [b"".join(frames)] for i, frames in payloads.items()}
    remote = remote_only(backend)
    return {
        "bare": calls_to(echoes, "echo", payloads),
        "bare_whole": calls_to(echoes, "echo", whole),
        "floor": calls_to(twins, "compute_only", payloads),
        "twin": calls_to(twins, "run", payloads),
        "direct": calls_to(backend.cluster.handles, "run", payloads),
        "backend": lambda: remote.run(groups),
        "compiled": lambda: backend.run(groups),
    }


def bench_dispatch_batch(
    backend: RayExpertBackend, echoes: dict[int, ActorHandle], batch: int, calls: int
) -> Dispatch:
    cluster = backend.cluster
    groups = layer_groups(cluster.plan, batch)
    payloads = requests(cluster.plan, groups)
    nodes = {a.index: a.node_id for a in cluster.plan.actors}
    twins = {i: spawn_twin(cluster.specs[i], nodes[i]) for i in payloads}
    try:
        calls = scaled(calls, max(len(b"".join(p)) for p in payloads.values()))
        ways = dispatch_ways(backend, groups, payloads, echoes, twins)
        ways["twin"]()  # the twins load their experts
        ray_get([t.medians_us.remote() for t in twins.values()])
        us = interleaved(ways, calls)
        inside = ray_get([t.medians_us.remote() for t in twins.values()])
    finally:
        for t in twins.values():
            ray.kill(t)
    slowest = max(inside, key=lambda m: m["compute"])
    responses = ways["direct"]()
    alone = interleaved(
        {"encode": lambda: requests(cluster.plan, groups), "decode": lambda: decode_all(responses)},
        calls,
    )
    return Dispatch(
        list(payloads),
        [sum(map(len, p)) for p in payloads.values()],
        [len(p) for p in payloads.values()],
        us,
        slowest["compute"],
        slowest["run"] - slowest["compute"],
        alone["encode"],
        alone["decode"],
    )


DISPATCH_ROWS: list[tuple[str, Callable[[Dispatch], str]]] = [
    ("actors called", lambda d: ",".join(map(str, d.actors))),
    ("request KiB per actor", lambda d: "/".join(f"{n / 1024:.0f}" for n in d.request_bytes)),
    ("frames per request", lambda d: "/".join(map(str, d.frames))),
    ("bare echo, the same frames, one ray.get", lambda d: f"{d.us['bare']:.0f}"),
    ("  the same bytes as one object per actor", lambda d: f"{d.us['bare_whole']:.0f}"),
    ("twins: compute only, request echoed", lambda d: f"{d.us['floor']:.0f}"),
    ("twins: run (timed inside)", lambda d: f"{d.us['twin']:.0f}"),
    ("  in the actor: expert compute (slowest)", lambda d: f"{d.compute_us:.0f}"),
    ("  in the actor: decode + encode", lambda d: f"{d.actor_wire_us:.0f}"),
    ("expert actors' run, called directly", lambda d: f"{d.us['direct']:.0f}"),
    ("RayExpertBackend.run, .remote() path", lambda d: f"{d.us['backend']:.0f}"),
    ("RayExpertBackend.run, compiled graph", lambda d: f"{d.us['compiled']:.0f}"),
    ("  driver alone: group + encode", lambda d: f"{d.encode_us:.0f}"),
    ("  driver alone: decode", lambda d: f"{d.decode_us:.0f}"),
    ("gap over the bare trip, less compute", lambda d: f"{d.gap_us:.0f}"),
    ("  compute's cost beyond its own time", lambda d: f"{d.contention_us:.0f}"),
    ("  actor: decode + encode (twin - floor)", lambda d: f"{d.us['twin'] - d.us['floor']:.0f}"),
    ("  driver side (run - direct)", lambda d: f"{d.us['backend'] - d.us['direct']:.0f}"),
    ("  real actors vs twins (direct - twin)", lambda d: f"{d.us['direct'] - d.us['twin']:.0f}"),
    ("overhead ratio (run - compute) / bare", lambda d: f"{d.ratio('backend'):.2f}x"),
    ("  the same, compiled graph", lambda d: f"{d.ratio('compiled'):.2f}x"),
]


def report_dispatch(figures: dict[int, Dispatch]) -> None:
    print("\n== 2. dispatch of one MoE layer: RayExpertBackend.run vs bare echo (µs) ==")
    print(f"{'':<46}" + "".join(f"{f'batch {b}':>12}" for b in figures))
    for label, cell in DISPATCH_ROWS:
        print(f"{label:<46}" + "".join(f"{cell(d):>12}" for d in figures.values()))
    print("(the gap rows are of the .remote() path)")
    for b, d in figures.items():
        for way, name in (("backend", ".remote() path"), ("compiled", "compiled graph")):
            verdict = "met" if d.ratio(way) <= 1.2 else "NOT met"
            print(f"target <= 1.2x at batch {b}, {name}: {d.ratio(way):.2f}x -> {verdict}")


# ---- 3. compiled graphs


def bench_compiled(
    handles: Mapping[int, ActorHandle], payloads: dict[int, bytes], calls: int
) -> dict[str, float] | str:
    """µs per layer call: `.remote()` before, compiled graph, `.remote()` after teardown.
    Returns the reason instead when the graph cannot be compiled or run here. One frame per
    request (a batch-1 request is one)."""
    from ray.dag import InputNode, MultiOutputNode

    def normal() -> object:
        return ray_get([handles[i].run.remote(p) for i, p in payloads.items()])

    expected = normal()
    before = interleaved({"n": normal}, calls)["n"]
    try:
        with InputNode() as inp:
            outs = [handles[i].run.bind(inp[j]) for j, i in enumerate(payloads)]
            graph = MultiOutputNode(outs).experimental_compile()
    except Exception as e:  # whatever the failure, compiled graphs do not run here
        return f"{type(e).__name__}: {e}"
    try:
        args = list(payloads.values())
        if ray_get(graph.execute(*args)) != expected:
            return "compiled graph returned other bytes than the .remote() calls"
        compiled = interleaved({"c": lambda: ray_get(graph.execute(*args))}, calls)["c"]
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        graph.teardown()
    after = interleaved({"n": normal}, calls)["n"]
    return {"remote_before": before, "compiled": compiled, "remote_after": after}


def report_compiled(result: dict[str, float] | str, actors: int) -> None:
    print(f"\n== 3. Ray Compiled Graphs: one batch-1 layer call to {actors} actors' run (µs) ==")
    if isinstance(result, str):
        print(f"skipped: compiled graphs failed on this setup ({result[:300]})")
        return
    remote = min(result["remote_before"], result["remote_after"])
    print(
        f".remote() before {result['remote_before']:.0f}, after {result['remote_after']:.0f}; "
        f"compiled graph {result['compiled']:.0f} -> {result['compiled'] / remote:.2f}x "
        f"the better .remote() figure"
    )


def bench_wide(folder: Path, opts: Options) -> None:
    """Sections 2 and 3 on the wide-and-thin checkpoint's actors."""
    with offload_rt.load(folder, backend="ray", ray_options=RAY_OPTIONS) as model:
        backend = model.backend
        plan = backend.cluster.plan
        echoes = {a.index: spawn_echo(a.node_id) for a in plan.actors}
        try:
            figures = {
                b: bench_dispatch_batch(backend, echoes, b, opts.calls) for b in DISPATCH_BATCHES
            }
        finally:
            for h in echoes.values():
                ray.kill(h)
        report_dispatch(figures)
        payloads = {i: frames[0] for i, frames in requests(plan, layer_groups(plan, 1)).items()}
        backend.graph.teardown()  # an actor sits in one compiled graph at a time
        report_compiled(
            bench_compiled(backend.cluster.handles, payloads, opts.calls), len(payloads)
        )
        backend.run(layer_groups(plan, 1))  # the actors still answer after the teardown
        assert backend.graph.compiles == 2 and backend.graph.failures == 0
