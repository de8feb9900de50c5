"""The local expert backend: experts computed on this machine's device from the tiered store.

Per layer call: experts already resident run first while the missing ones load over the link
(`LinkLoader`: one worker thread; on CUDA each copy runs on its own stream from a pinned
buffer), each into a slot freed by LRU eviction. An expert needed by this call is pinned until
it has run, so a call never evicts its own experts; with fewer slots than experts in the call,
loads wait for earlier experts of the call to finish.

Options (`OffloadOptions`):
- prefetch: the model hands over its prediction of the next layer's experts
  (`prefetch(layer, ranked)`) while the current layer runs; their loads queue behind the
  demand loads, into slots of neither the predicted layer nor the one running.
- compute_on_miss: a missing expert held in the host tier is run on the CPU instead when the
  cost model (`MissCost`) says that finishes before its copy would.
Neither changes a result: every expert runs the same FFN (`model/ffn.py`) on the same rows, and the
MoE block sums the outputs in a fixed order.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Container, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import torch

from offload_rt.experts.cache import SlotCache
from offload_rt.experts.loader import LinkLoader
from offload_rt.experts.misscost import MissCost
from offload_rt.experts.prefetch import PrefetchTracker
from offload_rt.experts.store import ExpertStore
from offload_rt.grid import ExpertGrid
from offload_rt.model.ffn import ExpertFFN
from offload_rt.model.moe import ExpertKey


@dataclass(frozen=True)
class OffloadOptions:
    prefetch: bool = False  # load the experts the model predicts for the next layer
    compute_on_miss: bool = False  # run a missing expert on the CPU when that is faster


@dataclass(frozen=True)
class _Guard:
    """Experts a new load may not evict: some keys, and every expert of some layers."""

    keys: Container[ExpertKey]
    layers: Container[int] = ()

    def __contains__(self, key: object) -> bool:
        return key in self.keys or (isinstance(key, ExpertKey) and key.layer in self.layers)


def _check(options: OffloadOptions, store: ExpertStore) -> None:
    if options.compute_on_miss and not store.format.host_computable:
        raise ValueError(
            "compute_on_miss is not supported with quantized experts: they are dequantized "
            "into device scratch on use, not on the CPU"
        )
    behind_link = store.device.type != "cpu" or store.link is not None
    if options.compute_on_miss and not (behind_link and store.host_capacity != 0):
        raise ValueError(
            "compute_on_miss runs missing experts on the CPU from the host tier: it needs a "
            "device behind a link (a GPU, or link_gbps on a CPU) and host_experts != 0; got "
            f"device {store.device}, link {store.link}, host_experts {store.host_capacity}"
        )


class LocalExpertBackend:
    def __init__(
        self,
        store: ExpertStore,
        cache: SlotCache,
        grid: ExpertGrid,
        options: OffloadOptions = OffloadOptions(),
    ) -> None:
        _check(options, store)
        self.store = store
        self.cache = cache
        self.grid = grid  # the MoE layers: no guess covers the first, so it is kept resident
        self.loader = LinkLoader(None if store.link is None else store.link.bytes_per_s)
        cuda = store.device.type == "cuda"
        self._load_stream = torch.cuda.Stream(store.device) if cuda else None
        self.loads: dict[ExpertKey, Future] = {}  # loads whose end no layer call has seen
        self.landed: dict[ExpertKey, Future] = {}  # per load in `loads`: its w13 is in place
        self.tracker: PrefetchTracker | None = None
        self.miss_cost: MissCost | None = None
        self.wait_seconds = 0.0  # time layer calls spent waiting for loads
        self.passes = -1  # forward passes begun (a call for the first MoE layer begins one)
        self.now = 0  # the cache policy's clock: passes x MoE layers + the layer's ordinal
        self.host_computed = 0  # missing experts run on the CPU instead of loaded
        self.set_options(options)

    def set_options(self, options: OffloadOptions) -> None:
        """Turn prefetch and compute on a miss on or off (between forward passes: loads in
        flight finish first); counters carry on."""
        _check(options, self.store)
        self.settle()
        self.options = options
        self.tracker = (self.tracker or PrefetchTracker()) if options.prefetch else None
        device_is_host = self.store.device.type == "cpu"
        cost = self.miss_cost or MissCost(device_is_host=device_is_host)
        self.miss_cost = cost if options.compute_on_miss else None

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        keys = sorted(groups)
        if keys:
            self._tick(keys[0].layer)
        if self.tracker is not None and keys:
            self._settle(keys[0].layer, set(keys))
        self._reap()
        return _Call(self, groups, keys).execute()

    def _tick(self, layer: int) -> None:
        if layer == self.grid.first_layer:
            self.passes += 1
        self.now = max(self.passes, 0) * len(self.grid.layers) + self.grid.ordinal(layer)

    def prefetch(self, layer: int, ranked: Sequence[int], fetch: int | None = None) -> None:
        """The model's prediction for `layer`, most likely expert first: start loading the
        first `fetch` (None: all) not resident, never evicting a predicted expert, one of the
        layer now running, or one of the first MoE layer."""
        if self.tracker is None:
            return
        self.tracker.predicted(layer, ranked)
        if self.loads:
            self._reap()
        named = [ExpertKey(layer, e) for e in ranked]
        wanted = set(named)
        for key, load in self.tracker.pending(layer).items():
            if key not in wanted and self._cancel(key, load):
                self.tracker.dropped(key)  # an earlier prediction this one overrides
        for key in named:
            self.cache.touch(key)
        missing = [key for key in named[:fetch] if key not in self.cache]
        if missing:
            self._start_prefetches(layer, missing, wanted)

    def _start_prefetches(self, layer: int, missing: list[ExpertKey], wanted: set) -> None:
        # the layer's own residents the guess leaves out go first: the layer is about to run
        # without them; then the least recent of other layers, but never the first MoE
        # layer's: no guess covers it, so its experts come back only by having stayed resident
        stale = [k for k in self.cache.resident_keys() if k.layer == layer and k not in wanted]
        running = self.grid.previous_layer(layer)
        guard = _Guard(self._in_flight() | wanted, layers=(self.grid.first_layer, running))
        for key in missing:
            slot = self.cache.acquire(key, guard, prefer=stale, now=self.now)
            if slot is None:
                return
            self.loads[key] = self._submit(key, slot, urgent=False)
            self.tracker.issued(key, self.loads[key])

    def settle(self) -> None:
        """Wait until every load in flight has finished (their experts stay resident)."""
        concurrent.futures.wait(list(self.loads.values()))
        self._reap()

    def _settle(self, layer: int, used: set[ExpertKey]) -> None:
        assert self.tracker is not None
        for key, load in self.tracker.settle(layer, used):
            cancelled = self._cancel(key, load)
            self.tracker.unused(cancelled)
            if not cancelled:
                self.cache.demote(key)  # loaded for nothing: the first to make room

    def _cancel(self, key: ExpertKey, load: Future) -> bool:
        """Drop a prefetch load that has not started, and its slot."""
        if not self.loader.cancel(load):
            return False
        self._forget(key)
        self.cache.discard(key)
        self.cache.stats.bytes_loaded -= self.store.nbytes
        return True

    def _forget(self, key: ExpertKey) -> None:
        self.loads.pop(key, None)
        self.landed.pop(key, None)

    def _reap(self) -> None:
        """Forget finished loads; a failed one leaves its expert missing, to be loaded again."""
        for key, load in list(self.loads.items()):
            if load.done():
                self._forget(key)
                if load.cancelled() or load.exception() is not None:
                    self.cache.discard(key)

    def _cheap_victims(self) -> list[ExpertKey]:
        """With prefetch on, residents of layers past the first, least recent first: a
        guess brings them back ahead of their use, while the first MoE layer's only stay
        resident."""
        if self.tracker is None:
            return []
        first = self.grid.first_layer
        return [k for k in self.cache.resident_keys() if k.layer != first]

    def _in_flight(self) -> set[ExpertKey]:
        return {key for key, load in self.loads.items() if not load.done()}

    def _compute(self, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
        return self.store.weights(self.cache.slot_of(key))(x)

    def _compute_arriving(self, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
        """An expert whose load is in flight: its w13 matmul runs as soon as w13 has landed,
        while w2 still moves (a third of the expert's bytes), then its w2 matmul. The same
        two matmuls as `_compute`, so the same result."""
        landed = self.landed.get(key)
        if landed is None or not self.store.splits:
            self._wait(key)
            return self._compute(key, x)
        if not landed.done():
            self._wait_for([landed, self.loads[key]])
        if not landed.done():  # the load ended without landing w13: failed or cancelled
            self._wait(key)  # raises
        slot = self.cache.slot_of(key)
        h = self.store.weights(slot).up(x)
        self._wait(key)
        return self.store.weights(slot).down(h)

    def _host_choice(
        self, key: ExpertKey, rows: int, load: Future | None, copies_ahead: int = 0
    ) -> ExpertFFN | None:
        """The expert's host weights when computing it on the CPU beats waiting for its copy
        (`load` in flight, or a new one queued after `copies_ahead` more); None to copy."""
        if self.miss_cost is None:
            return None
        weights = self.store.host_weights(key)
        if weights is None:
            return None
        wait = self.loader.eta(load, nbytes=(copies_ahead + 1) * self.store.nbytes)
        return weights if self.miss_cost.prefer_host(rows, wait, lambda: weights) else None

    def _compute_on_host(self, x: torch.Tensor, ffn: ExpertFFN) -> torch.Tensor:
        self.host_computed += 1
        return ffn(x.to(ffn.w13.device)).to(x.device)

    def _submit(self, key: ExpertKey, slot: int, urgent: bool) -> Future:
        self.cache.stats.bytes_loaded += self.store.nbytes
        nbytes = self.store.nbytes
        landed: Future = Future()
        self.landed[key] = landed
        mark, queued = partial(landed.set_result, None), time.perf_counter()
        if self._load_stream is None:
            job = partial(self.store.load, key, slot, mark, queued)
            return self.loader.submit(job, nbytes, urgent)
        # the slot may have just been freed by an expert whose compute is still queued
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.store.device))
        job = partial(self._load_on_stream, key, slot, ready, mark, queued)
        return self.loader.submit(job, nbytes, urgent)

    def _load_on_stream(
        self,
        key: ExpertKey,
        slot: int,
        ready: torch.cuda.Event,
        landed: Callable[[], None],
        queued: float,
    ) -> None:
        stream = self._load_stream
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            self.store.load(key, slot, landed, queued)
        stream.synchronize()

    def _wait(self, key: ExpertKey) -> None:
        load = self.loads[key]
        start = time.perf_counter()
        try:
            load.result()
        except BaseException:
            self._forget(key)
            self.cache.discard(key)  # its slot holds a partial copy
            raise
        finally:
            self.wait_seconds += time.perf_counter() - start
        self._forget(key)

    def _wait_for(self, futures: list[Future]) -> None:
        """Block until the first of `futures` is done, counted as waiting for loads."""
        start = time.perf_counter()
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        self.wait_seconds += time.perf_counter() - start

    def _wait_any(self) -> None:
        """Block until some load in flight ends (its slot can then be taken)."""
        in_flight = [self.loads[k] for k in self._in_flight()]
        if not in_flight:
            raise RuntimeError("no expert slot can be freed: every slot is pinned by this call")
        concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            **self.cache.stats.as_dict(),
            "host_resident": self.store.host_resident(),
            "load_wait_seconds": self.wait_seconds,
        }
        if self.store.link is not None:
            out["link_seconds"] = self.store.link.seconds
        if self.tracker is not None:
            out.update(self.tracker.stats.as_dict())
        if self.miss_cost is not None:
            out["host_computed"] = self.host_computed
        return out

    def close(self) -> None:
        self.loader.close()


class _Call:
    """One layer call: its experts sorted into resident, on their way (prefetched), to run
    on the CPU, and to load (as slots allow, in order); each computed once it is there."""

    def __init__(
        self, backend: LocalExpertBackend, groups: Mapping[ExpertKey, torch.Tensor], keys: list
    ) -> None:
        self.b = backend
        self.groups = groups
        self.ready: list[ExpertKey] = []
        self.coming: list[ExpertKey] = []
        self.host: dict[ExpertKey, ExpertFFN] = {}
        self.pending: list[ExpertKey] = []  # to load, not yet given a slot, in order
        for key in keys:
            if backend.cache.lookup(key, backend.now) is not None:
                (self.coming if key in backend.loads else self.ready).append(key)
                continue
            rows = groups[key].shape[0]
            weights = backend._host_choice(key, rows, None, copies_ahead=len(self.pending))
            if weights is None:
                self.pending.append(key)
            else:
                self.host[key] = weights
        self.loading = list(self.pending)
        self.pinned = set(keys)

    def execute(self) -> dict[ExpertKey, torch.Tensor]:
        b, groups = self.b, self.groups
        for key in self.coming:  # queued before this call's misses: they go first
            b.loader.promote(b.loads[key])
        self.start_loads()
        out = {}
        for key in self.ready:
            out[key] = b._compute(key, groups[key])
            self.done(key)
        for key, weights in self.host.items():
            out[key] = b._compute_on_host(groups[key], weights)
        for key in self.coming:
            # on the CPU or not, the load goes on: the expert lands in its slot
            weights = b._host_choice(key, groups[key].shape[0], b.loads[key])
            out[key] = self._run(key, weights)
        for key in self.loading:
            while key not in b.loads:
                self.start_loads()
                if key not in b.loads:
                    b._wait_any()
            out[key] = self._run(key, None)
        return out

    def _run(self, key: ExpertKey, host: ExpertFFN | None) -> torch.Tensor:
        """A coming or loading expert: on the CPU from `host`, or in its slot once there."""
        x = self.groups[key]
        if host is None:
            out = self.b._compute_arriving(key, x)
        else:
            out = self.b._compute_on_host(x, host)
        self.done(key)
        return out

    def start_loads(self) -> None:
        b = self.b
        while self.pending:
            guard = _Guard(self.pinned | b._in_flight())
            victims = b._cheap_victims()
            slot = b.cache.acquire(self.pending[0], guard, prefer=victims, now=b.now)
            if slot is None:
                return
            key = self.pending.pop(0)
            b.loads[key] = b._submit(key, slot, urgent=True)

    def done(self, key: ExpertKey) -> None:
        self.pinned.discard(key)
        self.start_loads()
