"""The hybrid placement at load: a device memory budget turned into expert slots, the cost
figures measured on this machine, the routing rates (uniform, or a recorded trace's), and the
planner's choice (`experts/hybrid.py`).

The budget (`gpu_memory_gb`, in GiB as the Ray backend's) is what the model may use on the
device: its dense weights in the compute dtype, a reserve for the KV cache of
`RESERVE_TOKENS` positions and for activations, and expert slots in what is left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt.analysis.traces import RoutingTrace, read_trace
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.loader import resolve_capacity
from offload_rt.experts.formats import expert_format, expert_nbytes
from offload_rt.experts.hybrid import HybridCosts, HybridPlan, Routing, plan_hybrid
from offload_rt.experts.misscost import cycle_seconds
from offload_rt.grid import ExpertGrid, ExpertKey
from offload_rt.models import dense_nbytes, kv_bytes_per_token

GIB = 2**30
RESERVE_TOKENS = 4096  # KV positions the budget keeps free: one 4096-token row, or 8 of 512
ACTIVATION_BYTES = 256 * 2**20  # activations, a prefill's logits, the allocator's slack
COST_REPEATS = 5  # timings are the best of this many passes
COST_BYTES = 512 * 2**20  # experts cycled through when timing: more than a CPU's caches


@dataclass(frozen=True)
class DeviceBudget:
    total_bytes: int  # what the model may use on the device
    dense_bytes: int  # its dense weights there
    reserve_bytes: int  # KV cache and activations
    expert_bytes: int  # one packed expert

    @classmethod
    def of(
        cls, gpu_memory_gb: float, ckpt: Checkpoint, dtype: torch.dtype, expert_bytes: int
    ) -> DeviceBudget:
        if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)):
            raise ValueError(f"gpu_memory_gb must be a number of GiB, got {gpu_memory_gb!r}")
        if not gpu_memory_gb > 0:
            raise ValueError(f"gpu_memory_gb must be positive, got {gpu_memory_gb}")
        reserve = RESERVE_TOKENS * kv_bytes_per_token(ckpt.config, dtype) + ACTIVATION_BYTES
        budget = cls(int(gpu_memory_gb * GIB), dense_nbytes(ckpt, dtype), reserve, expert_bytes)
        if budget.slots < 0:
            raise ValueError(
                f"gpu_memory_gb {gpu_memory_gb} does not hold {ckpt.folder}'s dense weights "
                f"({_size(budget.dense_bytes)} in {str(dtype).removeprefix('torch.')}) and the "
                f"KV/activation reserve ({_size(reserve)}): give at least "
                f"{(budget.dense_bytes + reserve) / GIB:.4f}"
            )
        return budget

    @property
    def slots(self) -> int:
        """Expert slots in what the dense weights and the reserve leave (negative: short)."""
        left = self.total_bytes - self.dense_bytes - self.reserve_bytes
        return left // self.expert_bytes if left >= 0 else -1

    def describe(self) -> str:
        return (
            f"device budget {_size(self.total_bytes)}: dense weights "
            f"{_size(self.dense_bytes)}, reserve {_size(self.reserve_bytes)} (KV of "
            f"{RESERVE_TOKENS} positions, activations), {self.slots} expert slots of "
            f"{_size(self.expert_bytes)}"
        )


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def measure_costs(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, link_bytes_per_s: float | None
) -> HybridCosts:
    """Time experts computed by the CPU from host RAM and by the device from a slot at one
    row, cycling over distinct experts of at least `COST_BYTES` in all, as decode reads them
    (timing one expert again and again measures a CPU's cache, not its memory). The link's
    rate is the simulated one, else a pinned copy's. On a CPU device the device's time is the
    CPU's: the same cores."""
    fmt = expert_format(ckpt.config, device, dtype)
    nbytes = fmt.numel * fmt.storage_dtype.itemsize
    keys = list(ckpt.config.grid.keys())[: max(2, -(-COST_BYTES // nbytes))]
    hosts = [torch.empty(fmt.numel, dtype=fmt.storage_dtype) for _ in keys]
    for key, buf in zip(keys, hosts):
        fmt.pack(ckpt.expert(key.layer, key.expert), buf)
    cpu_s = cycle_seconds([fmt.host_ffn(buf) for buf in hosts], repeats=COST_REPEATS)
    if device.type == "cpu":
        if link_bytes_per_s is None:
            raise ValueError("a hybrid placement on a CPU device needs a simulated link_gbps")
        return HybridCosts(nbytes, cpu_s, link_bytes_per_s, cpu_s, device_is_host=True)
    slots = [buf.to(device) for buf in hosts]
    device_s = cycle_seconds([fmt.weights(fmt.views(slot)) for slot in slots], repeats=COST_REPEATS)
    link = link_bytes_per_s or _copy_rate(hosts[0], slots[0])
    return HybridCosts(nbytes, cpu_s, link, device_s, device_is_host=False)


def _copy_rate(host: torch.Tensor, slot: torch.Tensor) -> float:
    """Bytes per second of a pinned host->device copy of one expert (best of a few)."""
    pinned = host.pin_memory()
    best = float("inf")
    for _ in range(COST_REPEATS):
        torch.cuda.synchronize(slot.device)
        start = time.perf_counter()
        slot.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize(slot.device)
        best = min(best, time.perf_counter() - start)
    return pinned.numel() * pinned.element_size() / best


def routing_of(grid: ExpertGrid, top_k: int, trace: str | Path | None) -> Routing:
    """Uniform routing, or the per-expert frequencies of a recorded trace's decode passes
    (all its passes when it has none)."""
    if trace is None:
        return Routing.even(grid, top_k)
    return Routing.from_counts(grid, top_k, expert_counts(read_trace(trace), grid, str(trace)))


def expert_counts(trace: RoutingTrace, grid: ExpertGrid, source: str) -> dict[ExpertKey, float]:
    if trace.num_experts != grid.experts or trace.num_layers <= grid.layers[-1]:
        raise ValueError(
            f"{source}: a trace of {trace.num_layers} layers x {trace.num_experts} experts "
            f"does not fit this model ({grid.describe()})"
        )
    passes = [p for i, p in enumerate(trace.passes) if not trace.is_prompt(i)] or trace.passes
    counts: dict[ExpertKey, float] = {}
    for one in passes:
        for layer in grid.layers:
            for e in one[layer]:
                key = ExpertKey(layer, e)
                counts[key] = counts.get(key, 0.0) + 1.0
    return counts


def plan_for(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    slots: int,
    cpu_experts: int | str | None,
    cpu_moe_layers: int | None,
    link_gbps: float | None,
    compute_on_miss: bool = False,
    routing_trace: str | Path | None = None,
) -> HybridPlan:
    """The placement `load` asks for, on costs measured here."""
    cfg = ckpt.config
    routing = routing_of(cfg.grid, cfg.num_experts_per_tok, routing_trace)
    link = None if link_gbps is None else link_gbps * 1e9
    costs = measure_costs(ckpt, device, dtype, link)
    return plan_hybrid(routing, costs, slots, cpu_experts, cpu_moe_layers, compute_on_miss)


@dataclass(frozen=True)
class Placement:
    """Where a local model's experts go: the device slots to allocate, and the CPU set's plan
    when a hybrid was asked for."""

    slots: int  # device slots to allocate
    plan: HybridPlan | None  # None: every expert on the device side
    budget: DeviceBudget | None  # the memory budget the slots came from, when given


def local_placement(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    cache_experts: int | None,
    gpu_memory_gb: float | None,
    cpu_experts: int | str | None,
    cpu_moe_layers: int | None,
    link_gbps: float | None,
    compute_on_miss: bool,
    routing_trace: str | Path | None,
) -> Placement:
    """`load`'s local options resolved: slots from `cache_experts` or the budget, and the
    hybrid plan (which needs a device behind a link, as compute on a miss does)."""
    total = ckpt.config.grid.total
    hybrid = cpu_experts is not None or cpu_moe_layers is not None
    if gpu_memory_gb is not None and cache_experts is not None:
        raise ValueError(
            f"give cache_experts ({cache_experts}) or gpu_memory_gb ({gpu_memory_gb}), not "
            "both: the budget sets the device slots"
        )
    if routing_trace is not None and not hybrid:
        raise ValueError(
            "routing_trace gives the hybrid planner its expert frequencies: it needs "
            "cpu_experts or cpu_moe_layers"
        )
    if hybrid and device.type == "cpu" and link_gbps is None:
        raise ValueError(
            "a hybrid placement puts experts on the CPU beside a device behind a link: on a "
            "CPU device give link_gbps (a simulated link), or use a GPU"
        )
    budget = None
    if gpu_memory_gb is not None:
        budget = DeviceBudget.of(gpu_memory_gb, ckpt, dtype, expert_nbytes(ckpt.config, dtype))
        slots = min(budget.slots, total)
        if slots < 1 and not hybrid:
            raise ValueError(
                f"{budget.describe()}: no expert slot; raise gpu_memory_gb or put experts on "
                "the CPU (cpu_experts, cpu_moe_layers)"
            )
    else:
        slots = resolve_capacity(cache_experts, total)
    if not hybrid:
        return Placement(slots, None, budget)
    plan = plan_for(
        ckpt,
        device,
        dtype,
        slots,
        cpu_experts,
        cpu_moe_layers,
        link_gbps,
        compute_on_miss,
        routing_trace,
    )
    return Placement(max(1, plan.slots), plan, budget)  # a cache keeps one slot, even unused
