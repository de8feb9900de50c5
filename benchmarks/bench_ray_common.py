"""Shared set-up and timing of the Ray benchmarks (`bench_ray.py`, `bench_ray_dispatch.py`):
the checkpoints, the simulated 3-node cluster, echo actors, framed payloads, interleaved
timing."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from bench_local import write_random
from ray.actor import ActorHandle
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from offload_rt import ExpertKey
from offload_rt.distributed.backend import frame_count
from offload_rt.distributed.cluster import NAMESPACE, RayOptions
from offload_rt.distributed.frames import decode_groups, pack_groups

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
    ray_get(handle.echo.remote(0))
    return handle


def ray_get(refs: object) -> object:
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
