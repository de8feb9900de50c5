"""The Ray expert backend against bare Ray round trips and against the local backend (issue 3).

All on one simulated 3-node cluster (`ray.cluster_utils.Cluster`: head + 2 workers, one CPU
each, as in tests/ray_helpers.py), in one run, each figure beside its baseline. Figures are
medians of round trips timed in 10 alternating rounds (so drifting load hits all alike).

1. Wire encoding. Hidden states (N, 4096) float32, N in 1, 4, 16, sent to a bare echo actor on
   a worker node and back, as one object: (a) the torch tensor itself (Ray pickles it), (b) a
   numpy array (pickle-5 buffers), (c) the wire message (`frames.pack_groups`, one bytes
   object), decoded and re-encoded by the actor and decoded again here, as the runtime does;
   (b) and (c) include the copy into a tensor that owns its memory; (d) the same bytes echoed
   with no encoding (the floor of (c)). Then as the runtime sends it: (e) = (c) cut into
   frames of at most `RayOptions.frame_bytes` (one Ray argument and return value each, under
   Ray's 100 KiB inline limit), and (f) its floor, those frames echoed.
2. Dispatch overhead of one MoE layer: `RayExpertBackend.run(groups)` at batch 1 (2 experts on
   2 actors, as the single-token path sends them) and batch 16 (a random top-2 routing over
   8 experts, 3 actors), against bare echo actors pinned to the same nodes, sent the very
   request frames the backend sends (same arguments, same num_returns), all in flight at once,
   one `ray.get`. `RayExpertBackend.run` both ways: `.remote()` calls (`compiled_graph=False`),
   and through the compiled graph over all 3 actors (each visited every call). Beside it, the
   same bytes as one object per actor (what a plain `.remote(bytes)` does: over 100 KiB it
   goes through the object store). The checkpoint is wide and thin:
   hidden 4096 (Mixtral's, so the bytes on the wire are real) and expert width 32, so compute
   is small; what there is, is subtracted. It is timed inside an actor: a twin of each expert
   actor (`ExpertActor` subclassed to time its `run` and the expert compute in it), same spec
   and node, called alike. Dispatch overhead ratio = (backend.run - compute of the slowest
   actor) / bare round trip; the target is <= 1.2x. The gap over the bare trip (compute left
   out) is split, exactly, into: what the compute costs beyond its own time (the twins asked
   to compute and echo the request, no decode or encode, less the bare trip and the compute:
   the cores and caches it takes from the Ray processes beside it), the actor's decode and
   encode (twins' run less that), the driver side (backend.run less the expert actors' run
   called directly with the same frames: grouping, encode, decode), and the twins against the
   real actors (noise). Encode and decode in this process are also timed alone.
3. Ray Compiled Graphs: the batch-1 layer call (2 experts on 2 actors) to the expert actors'
   `run` (InputNode -> one `run.bind` per actor -> MultiOutputNode, `experimental_compile`)
   against the normal `.remote()` calls with the same payloads, before and after the graph's
   teardown. Skipped with a message where compiling or running it fails.
4. Decode tokens/s of the ray backend (3 CPU actors, one per node) against the local backend
   (every expert resident in this process) at batch 1 and 16, greedy, decode steps only
   (prefill and a warm-up run untimed), alternating repeats, medians; greedy tokens of all
   runs compared. Random checkpoint: hidden 512, 4 layers, 8 experts, vocab 2000, fp32.

Note on 2-core machines: torch's OpenMP threads spin for a while after each parallel op (a
copy of 32768+ elements is one), taking a core from the Ray processes on the same cores. The
"driver at 1 torch thread" decode figures show how much of a gap that is.

Checkpoints are written once with `save_pretrained` into --workdir and reused. Every `ray.get`
has a timeout; Ray and the cluster are shut down at the end and no raylet may be left.
Figures with an object over Ray's 100 KiB inline limit (through the object store, about 10 ms
a trip here) take a third of the calls.

Run from the repository root: `python benchmarks/bench_ray.py` (about 2 minutes on 2 cores);
`--quick` runs few calls and steps as a smoke test. On a 2-core machine the driver, 3 raylets
and the actors share 2 cores: every Ray figure includes that oversubscription.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from bench_local import write_random
from ray.actor import ActorHandle
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt import ExpertKey, OffloadModel
from offload_rt.distributed.actor import ActorSpec, ExpertActor
from offload_rt.distributed.backend import RayExpertBackend, frame_count
from offload_rt.distributed.cluster import NAMESPACE, RayOptions
from offload_rt.distributed.frames import decode_groups, pack_groups
from offload_rt.distributed.placement import PlacementPlan
from offload_rt.engine import BatchDecoder
from offload_rt.model.moe import group_by_expert

BASE = dict(num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
# Mixtral's hidden size with 32-wide experts: real bytes on the wire, negligible compute
WIDE = dict(
    **BASE,
    vocab_size=64,
    hidden_size=4096,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
DECODE = dict(
    **BASE,
    vocab_size=2000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # spread logits, so greedy tokens of the two backends can be compared without near-ties
    initializer_range=0.1,
)
WIRE_ROWS = (1, 4, 16)  # tokens of the hidden states in section 1
DISPATCH_BATCHES = (1, 16)
DECODE_BATCHES = (1, 16)
PROMPT_LEN = 16
INLINE_BYTES = 100 * 1024  # Ray's max_direct_call_object_size: larger goes via the store
TIMEOUT_S = 60.0  # every ray.get
RAY_OPTIONS = RayOptions(
    call_timeout_s=TIMEOUT_S, start_timeout_s=180.0, restart_timeout_s=10.0, compiled_graph=True
)


@dataclass(frozen=True)
class Options:
    workdir: Path  # where the random checkpoints are cached
    calls: int  # timed round trips per figure of sections 1-3
    steps: int  # timed decode steps per run
    repeats: int  # timed decode runs per backend and batch; the median is reported


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--calls", type=int, default=300, help="timed round trips per figure")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs per backend")
    p.add_argument("--quick", action="store_true", help="40 calls, 6 steps, 1 repeat")
    a = p.parse_args()
    if a.quick:
        return Options(a.workdir, calls=40, steps=6, repeats=1)
    return Options(a.workdir, a.calls, a.steps, a.repeats)


# ---- set-up


def checkpoint(workdir: Path, model: dict) -> Path:
    """The random checkpoint folder of config `model`, written on first use."""
    name = f"mixtral-d{model['hidden_size']}-f{model['intermediate_size']}"
    return write_random(
        workdir / f"{name}-l{model['num_hidden_layers']}-v{model['vocab_size']}", model
    )


def start_cluster() -> Cluster:
    """Head + 2 workers, one CPU and one custom resource each; this driver connected."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
    for i in (1, 2):
        c.add_node(num_cpus=1, resources={f"node{i}": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace=NAMESPACE, logging_level="WARNING")
    return c


def shut_down(c: Cluster) -> list[str]:
    """Disconnect, stop the cluster; returns the Ray processes still alive after 20 s."""
    ray.shutdown()
    c.shutdown()
    deadline = time.monotonic() + 20
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


class Echo:
    """A bare actor: Ray's round trip with none of the expert backend in it."""

    def echo(self, *objs: object) -> object:
        """Its arguments back, as many return values (the caller's num_returns)."""
        return objs[0] if len(objs) == 1 else objs

    def echo_wire(self, *frames: bytes) -> bytes | tuple[bytes, ...]:
        """What an expert actor does to the frames, less the compute."""
        out = pack_groups("response", decode_groups("request", frames)).frames(len(frames))
        return out[0] if len(out) == 1 else tuple(out)


def spawn_echo(node_id: str) -> ActorHandle:
    """An echo actor on `node_id`, taking no CPU (the expert actors hold every CPU)."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    handle = ray.remote(Echo).options(num_cpus=0, scheduling_strategy=strategy).remote()
    _get(handle.echo.remote(0))
    return handle


def _get(refs: object) -> object:
    return ray.get(refs, timeout=TIMEOUT_S)


def submit(handle: ActorHandle, method: str, frames: list) -> list:
    """`handle.method(*frames)` with a return value per frame, as `RayExpertBackend` calls."""
    fn = getattr(handle, method)
    if len(frames) == 1:
        return [fn.remote(frames[0])]
    return fn.options(num_returns=len(frames)).remote(*frames)


def framed(x: torch.Tensor, frames: int | None = None) -> list[bytes]:
    """The request of one expert's tokens x, in `frames` frames (None: as the runtime cuts)."""
    packed = pack_groups("request", {ExpertKey(0, 0): x})
    return packed.frames(frames or frame_count(packed.nbytes, RAY_OPTIONS))


# ---- timing


def _samples(fn: Callable[[], object], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: Mapping[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median µs per call of each fn, after 5 untimed calls each; timed in 10 alternating
    rounds, so drifting background load hits every fn alike."""
    for fn in fns.values():
        _samples(fn, 5)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(10):
        for name, fn in fns.items():
            samples[name] += _samples(fn, max(1, calls // 10))
    return {name: statistics.median(t) * 1e6 for name, t in samples.items()}


def scaled(calls: int, nbytes: int) -> int:
    """Fewer calls for payloads that go through the object store (10x slower a trip)."""
    return calls if nbytes <= INLINE_BYTES else max(10, calls // 3)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- 1. wire encoding


def wire_trips(echo: ActorHandle, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    fixed, cut = framed(x, 1), framed(x)

    def torch_trip() -> torch.Tensor:
        return _get(echo.echo.remote(x))

    def numpy_trip() -> torch.Tensor:
        return torch.from_numpy(np.array(_get(echo.echo.remote(x.numpy()))))

    def wire_trip(frames: int | None) -> Callable[[], object]:
        def trip() -> object:
            refs = submit(echo, "echo_wire", framed(x, frames))
            return decode_groups("response", _get(refs))

        return trip

    return {
        "torch": torch_trip,
        "numpy": numpy_trip,
        "wire": wire_trip(1),
        "bytes": lambda: _get(echo.echo.remote(fixed[0])),
        "wire_frames": wire_trip(None),
        "bytes_frames": lambda: _get(submit(echo, "echo", cut)),
    }


def bench_wire(opts: Options) -> dict[int, dict[str, float]]:
    echo = spawn_echo(node_with("node1"))
    try:
        out = {}
        for rows in WIRE_ROWS:
            x = torch.randn(rows, WIDE["hidden_size"])  # (N, D)
            out[rows] = interleaved(wire_trips(echo, x), scaled(opts.calls, x.nbytes))
        return out
    finally:
        ray.kill(echo)


def report_wire(figures: dict[int, dict[str, float]]) -> None:
    print("\n== 1. wire encoding: round trip to a bare echo actor on a worker node (µs) ==")
    print(
        f"{'shape':>10} {'KiB':>4} {'(a) torch':>10} {'(b) numpy':>10} {'(c) wire':>9} "
        f"{'c/a':>6} {'c/b':>6}  {'(d) bytes':>10}  {'(e) frames':>10} {'(f) bytes':>10}"
    )
    for rows, f in figures.items():
        kib = rows * WIDE["hidden_size"] * 4 // 1024
        print(
            f"{f'[{rows}, 4096]':>10} {kib:>4} {f['torch']:>10.0f} {f['numpy']:>10.0f} "
            f"{f['wire']:>9.0f} {f['wire'] / f['torch']:>5.2f}x {f['wire'] / f['numpy']:>5.2f}x  "
            f"{f['bytes']:>10.0f}  {f['wire_frames']:>10.0f} {f['bytes_frames']:>10.0f}"
        )
    print(
        "the runtime uses (e): wire messages (msgpack header + raw tensor bytes) in bytes "
        f"frames of at most {RAY_OPTIONS.frame_bytes // 1024} KiB (frames.py)"
    )


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
    _get(handle.ping.remote())
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
        values = iter(_get([r for rs in refs.values() for r in rs]))
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
        _get([t.medians_us.remote() for t in twins.values()])
        us = interleaved(ways, calls)
        inside = _get([t.medians_us.remote() for t in twins.values()])
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
        return _get([handles[i].run.remote(p) for i, p in payloads.items()])

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
        if _get(graph.execute(*args)) != expected:
            return "compiled graph returned other bytes than the .remote() calls"
        compiled = interleaved({"c": lambda: _get(graph.execute(*args))}, calls)["c"]
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


# ---- 4. decode


@dataclass(frozen=True)
class DecodeRun:
    tokens: list[list[int]]  # greedy tokens per row, decode steps only
    seconds: float  # wall time of the decode steps


Runner = Callable[[list[list[int]], int], DecodeRun]


def runner(model: OffloadModel) -> Runner:
    def run(prompts: list[list[int]], steps: int) -> DecodeRun:
        decoder = BatchDecoder(model.model, prompts, PROMPT_LEN + steps)
        logits = decoder.prefill()
        live = [True] * len(prompts)
        per_step: list[list[int]] = []
        start = time.perf_counter()
        for _ in range(steps):
            per_step.append(logits.argmax(-1).tolist())
            logits = decoder.step(per_step[-1], live)
        return DecodeRun([list(r) for r in zip(*per_step)], time.perf_counter() - start)

    return run


def remote_path_runner(model: OffloadModel) -> Runner:
    """The model's layer calls through `.remote()` calls, its compiled graph set aside."""
    run = runner(model)

    def run_remote(prompts: list[list[int]], steps: int) -> DecodeRun:
        graph, model.backend.graph = model.backend.graph, None
        try:
            return run(prompts, steps)
        finally:
            model.backend.graph = graph

    return run_remote


def on_one_thread_runner(run: Runner) -> Runner:
    def run_1t(prompts: list[list[int]], steps: int) -> DecodeRun:
        with torch_threads(1):
            return run(prompts, steps)

    return run_1t


def warm_all_experts(model: OffloadModel) -> None:
    """Every expert resident (`OffloadModel.warm`), or an error saying how many are not."""
    resident, total = model.warm(), model.config.num_experts_total
    if resident != total:
        raise RuntimeError(f"warm-up left {resident} of {total} experts resident")


def measure(
    runners: dict[str, Runner], prompts: list[list[int]], opts: Options
) -> dict[str, list[DecodeRun]]:
    """One untimed warm-up each, then `repeats` rounds in which every runner runs once."""
    for run in runners.values():
        run(prompts, min(opts.steps, 4))
    runs: dict[str, list[DecodeRun]] = {name: [] for name in runners}
    for _ in range(opts.repeats):
        for name, run in runners.items():
            runs[name].append(run(prompts, opts.steps))
    return runs


def bench_decode(folder: Path, opts: Options) -> dict[int, dict[str, list[DecodeRun]]]:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, DECODE["vocab_size"], (16, PROMPT_LEN), generator=g).tolist()
    with (
        offload_rt.load(folder) as local,
        offload_rt.load(folder, backend="ray", ray_options=RAY_OPTIONS) as remote,
    ):
        warm_all_experts(local)
        warm_all_experts(remote)
        ray_runner = runner(remote)
        runners = {
            "local": runner(local),
            "ray": ray_runner,
            "ray_1t": on_one_thread_runner(ray_runner),
            "ray_remote": remote_path_runner(remote),
        }
        return {b: measure(runners, prompts[:b], opts) for b in DECODE_BATCHES}


def tokens_per_s(runs: list[DecodeRun]) -> float:
    return statistics.median(len(r.tokens) * len(r.tokens[0]) / r.seconds for r in runs)


def report_decode(figures: dict[int, dict[str, list[DecodeRun]]], opts: Options) -> None:
    print(
        f"\n== 4. decode tokens/s, {opts.steps} steps, median of {opts.repeats}: ray (3 CPU "
        f"actors, 1 per node) vs local (this process, {torch.get_num_threads()} threads) =="
    )
    print(
        f"{'batch':>5} {'local':>8} {'ray':>8} {'ray/local':>9}  {'ray, driver 1t':>14} "
        f"{'/local':>7}  {'ray .remote()':>13} {'/local':>7}  {'ms/step local':>13} {'ray':>6} "
        f"{'ray/layer':>9}  tokens"
    )
    layers = DECODE["num_hidden_layers"]
    for b, runs in figures.items():
        tps = {name: tokens_per_s(r) for name, r in runs.items()}
        first = runs["local"][0].tokens
        same = all(r.tokens == first for rs in runs.values() for r in rs)
        ms_local, ms_ray = 1e3 * b / tps["local"], 1e3 * b / tps["ray"]
        print(
            f"{b:>5} {tps['local']:>8.1f} {tps['ray']:>8.1f} {tps['ray'] / tps['local']:>8.2f}x  "
            f"{tps['ray_1t']:>14.1f} {tps['ray_1t'] / tps['local']:>6.2f}x  "
            f"{tps['ray_remote']:>13.1f} {tps['ray_remote'] / tps['local']:>6.2f}x  "
            f"{ms_local:>13.2f} {ms_ray:>6.2f} {ms_ray / layers:>9.2f}  "
            f"{'identical' if same else 'DIFFER'}"
        )
    print(
        "(ray, ray driver 1t: compiled-graph path; ray .remote(): the same model with its graph "
        "set aside; ms per decode step of the compiled path; ray/layer: over its MoE layers)"
    )


# ---- main


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} cores; "
        f"{opts.calls} calls per figure; load average {os.getloadavg()[0]:.2f} "
        "(other work on the machine skews every figure)",
        flush=True,
    )
    wide, small = checkpoint(opts.workdir, WIDE), checkpoint(opts.workdir, DECODE)
    cluster = start_cluster()
    try:
        report_wire(bench_wire(opts))
        bench_wide(wide, opts)
        report_decode(bench_decode(small, opts), opts)
    finally:
        left = shut_down(cluster)
    print(f"\nRay processes left after shutdown: {left or 'none'}")
    print(
        f"load average {os.getloadavg()[0]:.2f} at the end; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
