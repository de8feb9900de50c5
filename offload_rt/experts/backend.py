"""The local expert backend: experts computed on this machine's device from the tiered store.

Per layer call (`LayerCall`): experts already resident run first while the missing ones load
over the link, each into a slot the cache's policy frees. An expert needed by this call is
pinned until it has run, so a call never evicts its own experts; with fewer slots than experts
in the call, loads wait for earlier experts of the call to finish.

The backend wires its parts, one responsibility each:
- `Transport` (`transport.py`): moves packed experts into slots on the link's thread (demand
  first; on CUDA its own stream; a `SimulatedLink` on a machine without a GPU);
- `LoadTable` (`loads.py`): the loads in flight by expert, waited for and forgotten;
- `Eviction` (`eviction.py`): which residents a load may evict, and the policy's clock;
- `PrefetchController` (`prefetch.py`, option `prefetch`): the model's guesses of the next
  layer's experts turned into loads queued behind the demand loads;
- `MissPlanner` (`misscost.py`, option `compute_on_miss`): a missing expert held in the host
  tier run on the CPU when that finishes before its copy would;
- `ExpertRunner`: an expert computed in its slot, at once or as its load lands.
A fixed CPU set (option `cpu_experts`, chosen by `hybrid.py`'s planner) never enters a slot:
those experts are computed on the CPU from host buffers of their own, while the link moves
the call's misses and the device runs its residents.
No option changes a result: every expert runs the same FFN (`model/ffn.py`) on the same
rows, and the MoE block sums the outputs in a fixed order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from offload_rt.experts.cache import SlotCache
from offload_rt.experts.eviction import Eviction
from offload_rt.experts.loads import LoadTable
from offload_rt.experts.misscost import MissCost, MissPlanner
from offload_rt.experts.prefetch import PrefetchController
from offload_rt.experts.store import ExpertStore
from offload_rt.experts.transport import Link, Transport
from offload_rt.grid import ExpertGrid
from offload_rt.model.ffn import ExpertFFN
from offload_rt.model.moe import ExpertKey


@dataclass(frozen=True)
class OffloadOptions:
    prefetch: bool = False  # load the experts the model predicts for the next layer
    compute_on_miss: bool = False  # run a missing expert on the CPU when that is faster
    prefetch_from: str = "both"  # where the model guesses: "attention", "moe" or "both"
    # computed on the CPU from host RAM, never loaded into a device slot (`hybrid.py`)
    cpu_experts: frozenset[ExpertKey] = frozenset()


def _check(
    options: OffloadOptions, store: ExpertStore, grid: ExpertGrid, link: Link | None
) -> None:
    bandwidth = None if link is None else link.bytes_per_s
    behind_link = store.device.type != "cpu" or bandwidth is not None
    where = f"device {store.device}, link_gbps {bandwidth and bandwidth / 1e9}"
    if options.compute_on_miss and not (behind_link and store.has_host_tier):
        raise ValueError(
            "compute_on_miss runs missing experts on the CPU from the host tier: it needs a "
            "device behind a link (a GPU, or link_gbps on a CPU) and host_experts != 0; got "
            f"{where}, host_experts {store.host_capacity}"
        )
    if options.cpu_experts and not behind_link:
        raise ValueError(
            "a CPU set of experts needs a device behind a link (a GPU, or link_gbps on a "
            f"CPU): without one the device slots are host RAM already; got {where}"
        )
    strays = sorted(k for k in options.cpu_experts if k not in grid)
    if strays:
        raise ValueError(f"CPU set experts not in the model ({grid.describe()}): {strays[:4]}")


class ExpertRunner:
    """An expert computed in its device slot: at once when resident, or as its load lands."""

    def __init__(self, store: ExpertStore, cache: SlotCache, loads: LoadTable) -> None:
        self.store = store
        self.cache = cache
        self.loads = loads

    def resident(self, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
        return self.store.weights(self.cache.slot_of(key))(x)

    def arriving(self, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
        """An expert whose load is in flight: its w13 matmul runs as soon as w13 has landed,
        while w2 still moves (a third of the expert's bytes), then its w2 matmul. The same
        two matmuls as `resident`, so the same result."""
        if not self.store.splits:
            self.loads.wait(key)
            return self.resident(key, x)
        if not self.loads.wait_landed(key):  # the load ended without landing w13
            self.loads.wait(key)  # raises: it failed or was cancelled
        slot = self.cache.slot_of(key)
        h = self.store.weights(slot).up(x)
        self.loads.wait(key)
        return self.store.weights(slot).down(h)


class LocalExpertBackend:
    def __init__(
        self,
        store: ExpertStore,
        cache: SlotCache,
        grid: ExpertGrid,
        options: OffloadOptions = OffloadOptions(),
        link: Link | None = None,
    ) -> None:
        """`link`: how experts cross into the device slots (None: the device's own copy; a
        `SimulatedLink` on a machine without a GPU). The options are fixed for its life."""
        _check(options, store, grid, link)
        self.store = store
        self.cache = cache
        cache.keeps_all = cache.capacity >= grid.total  # no expert is ever evicted
        self.grid = grid
        self.options = options
        self.transport = Transport(store, link)
        self.loads = LoadTable(self.transport, cache)
        self.eviction = Eviction(cache, grid, prefetching=options.prefetch)
        self.runner = ExpertRunner(store, cache, self.loads)
        self.prefetcher: PrefetchController | None = None  # the model's, when prefetch is on
        if options.prefetch:
            self.prefetcher = PrefetchController(
                cache, self.eviction, self.loads, options.prefetch_from, options.cpu_experts
            )
        self.planner: MissPlanner | None = None
        if options.compute_on_miss:
            cost = MissCost(device_is_host=store.device.type == "cpu")
            self.planner = MissPlanner(store, self.transport, cost)
        self.cpu_set = options.cpu_experts
        self.cpu_computed = 0  # uses of a CPU set expert (each computed on the CPU)
        self._keys: list[list[ExpertKey]] | None = None  # `count_uses`'s, by layer and expert

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        keys = sorted(groups)
        device = [k for k in keys if k not in self.cpu_set] if self.cpu_set else keys
        if keys:
            self.eviction.tick(keys[0].layer)
            if self.prefetcher is not None:
                self.prefetcher.settle(keys[0].layer, set(device))
        self.loads.reap()
        cpu = [k for k in keys if k in self.cpu_set] if self.cpu_set else []
        if not cpu and all(k in self.cache and k not in self.loads for k in keys):
            # every expert resident, none arriving: what `LayerCall` would do, without it
            out = {}
            for key in keys:
                slot = self.eviction.lookup(key)
                assert slot is not None
                out[key] = self.store.weights(slot)(groups[key])
            return out
        return LayerCall(self, groups, device, cpu).execute()

    def resident(self, keys: list[ExpertKey]) -> list[ExpertFFN] | None:
        """For a caller that computes the experts itself (`model/rowlayer.py`): their weights
        in `keys`' order, with `run`'s bookkeeping (the layer's tick, the lookups and their
        counters), where each is resident in a format whose weights stay put and none is
        arriving or in the CPU set; else None, and nothing done (`run` serves them)."""
        if not keys or self.cpu_set or not self.store.format.stable_weights:
            return None
        if not all(k in self.cache and k not in self.loads for k in keys):
            return None
        self.eviction.tick(keys[0].layer)
        if self.prefetcher is not None:
            self.prefetcher.settle(keys[0].layer, set(keys))
        self.loads.reap()
        slots = [self.eviction.lookup(key) for key in keys]
        return [self.store.weights(s) for s in slots]  # type: ignore[arg-type]

    def fixed_weights(self) -> list[list[ExpertFFN]] | None:
        """Every expert's weights, by layer and expert, for a caller that computes a whole step
        itself (`model/rowstep.py`'s `token`), where they stay put for good: the cache holds
        every expert of the grid (so nothing is ever evicted) and all are resident, none
        loading, no CPU set, no prefetcher, a format whose weights stay put; else None. The
        caller then reports a step's uses through `count_uses`."""
        if not self.cache.keeps_all or self.cpu_set or self.prefetcher is not None:
            return None
        if not self.store.format.stable_weights or self.cache.stats.resident < self.grid.total:
            return None
        self.loads.reap()
        if self.loads.in_flight():
            return None
        return [
            [self.store.weights(self.cache.slot_of(k)) for k in self.grid.layer_keys(layer)]
            for layer in self.grid.layers
        ]

    def count_uses(self, chosen: Sequence[Sequence[int]]) -> None:
        """A whole step's uses, for the caller of `fixed_weights`: each MoE layer's tick and its
        chosen experts' lookups (all hits), as `resident` counts them layer by layer."""
        if self._keys is None:  # every expert's key, made once
            self._keys = [self.grid.layer_keys(layer) for layer in self.grid.layers]
        self.eviction.tick_pass()  # `fixed_weights`: every MoE layer, the cache keeps all
        self.cache.count_hits([keys[e] for keys, row in zip(self._keys, chosen) for e in row])

    def settle(self) -> None:
        """Wait until every load in flight has finished (their experts stay resident)."""
        self.loads.settle()

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            **self.cache.stats.as_dict(),
            "host_resident": len(self.store.host_buffers()),
            "load_wait_seconds": self.loads.wait_seconds,
            **self.transport.link.stats(),
        }
        if self.prefetcher is not None:
            out.update(self.prefetcher.tracker.stats.as_dict())
        if self.planner is not None:
            out["host_computed"] = self.planner.host_computed
        if self.cpu_set:
            out["cpu_experts"] = len(self.cpu_set)
            out["cpu_computed"] = self.cpu_computed
            out["cpu_resident"] = self.store.held
        return out

    def close(self) -> None:
        self.transport.close()


class LayerCall:
    """One layer call: its experts sorted into the CPU set's, resident, on their way
    (prefetched), to run on the CPU, and to load (as slots allow, in order); each computed
    once it is there. Loads start first; then the device's residents are launched, and the
    CPU computes its experts while the link moves the rest (on CUDA the residents' kernels
    run meanwhile: their inputs cross to the CPU before they are launched, so that copy
    does not wait for them)."""

    def __init__(
        self,
        backend: LocalExpertBackend,
        groups: Mapping[ExpertKey, torch.Tensor],
        keys: list[ExpertKey],
        cpu: list[ExpertKey],
    ) -> None:
        self.backend = backend
        self.loads, self.eviction = backend.loads, backend.eviction
        self.runner, self.planner = backend.runner, backend.planner
        self.loader = backend.transport.loader
        self.groups = groups
        self.ready: list[ExpertKey] = []
        self.coming: list[ExpertKey] = []
        # computed on the CPU: the CPU set's experts, then misses the planner sends there
        self.host: dict[ExpertKey, ExpertFFN] = {k: backend.store.hold(k) for k in cpu}
        self.pending: list[ExpertKey] = []  # to load, not yet given a slot, in order
        for key in keys:
            if self.eviction.lookup(key) is not None:
                (self.coming if key in self.loads else self.ready).append(key)
                continue
            weights = self._host_choice(key, None, copies_ahead=len(self.pending))
            if weights is None:
                self.pending.append(key)
            else:
                self.host[key] = weights
        self.loading = list(self.pending)
        self.pinned = set(keys)

    def execute(self) -> dict[ExpertKey, torch.Tensor]:
        groups, loads = self.groups, self.loads
        for key in self.coming:  # queued before this call's misses: they go first
            self.loader.promote(loads.future(key))
        self.start_loads()
        cpu = torch.device("cpu")
        host_x = {key: groups[key].to(cpu) for key in self.host}
        out = {}
        for key in self.ready:
            out[key] = self.runner.resident(key, groups[key])
            self.done(key)
        for key, weights in self.host.items():
            out[key] = self._on_host(key, host_x[key], weights)
        for key in self.coming:
            # on the CPU or not, the load goes on: the expert lands in its slot
            out[key] = self._run(key, self._host_choice(key, loads.future(key)))
        for key in self.loading:
            while key not in loads:
                self.start_loads()
                if key not in loads:
                    loads.wait_any()
            out[key] = self._run(key, None)
        return out

    def _host_choice(
        self, key: ExpertKey, load: Future | None, copies_ahead: int = 0
    ) -> ExpertFFN | None:
        """`MissPlanner.choose`, with the CPU's work of this call ahead of it; None (copy)
        when compute on a miss is off."""
        if self.planner is None:
            return None
        rows = self.groups[key].shape[0]
        ahead = [self.groups[k].shape[0] for k in self.host]
        return self.planner.choose(key, rows, load, copies_ahead, ahead)

    def _on_host(self, key: ExpertKey, x: torch.Tensor, weights: ExpertFFN) -> torch.Tensor:
        """An expert on the CPU: x (n, D) already in host memory, the output back on the
        device. A CPU set expert is counted here, a miss by the planner."""
        if key in self.backend.cpu_set:
            self.backend.cpu_computed += 1
            y = weights(x)
        else:
            y = self.planner.run(x, weights)  # type: ignore[union-attr]
        self.done(key)
        return y.to(self.groups[key].device)

    def _run(self, key: ExpertKey, host: ExpertFFN | None) -> torch.Tensor:
        """A coming or loading expert: on the CPU from `host`, or in its slot once there."""
        x = self.groups[key]
        if host is None:
            out = self.runner.arriving(key, x)
            self.done(key)
            return out
        return self._on_host(key, x.to("cpu"), host)

    def start_loads(self) -> None:
        while self.pending:
            slot = self.eviction.demand_slot(self.pending[0], self.pinned, self.loads.in_flight())
            if slot is None:
                return
            self.loads.start(self.pending.pop(0), slot, urgent=True)

    def done(self, key: ExpertKey) -> None:
        self.pinned.discard(key)
        self.start_loads()
