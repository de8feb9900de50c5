"""The local expert backend: experts computed on this machine's device from the tiered store.

Per layer call: experts already resident run first while the missing ones load on a loader
thread (and, on CUDA, on their own stream), each into a slot freed by LRU eviction. An expert
needed by this call is pinned until it has run, so a call never evicts its own experts; with
fewer slots than experts in the call, loads wait for earlier experts of the call to finish.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from offload_rt.experts.cache import SlotCache
from offload_rt.experts.store import ExpertStore
from offload_rt.model.moe import ExpertKey, expert_ffn


class LocalExpertBackend:
    def __init__(self, store: ExpertStore, cache: SlotCache) -> None:
        self.store = store
        self.cache = cache
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-rt-loader")
        cuda = store.device.type == "cuda"
        self._load_stream = torch.cuda.Stream(store.device) if cuda else None

    def run(self, groups: Mapping[ExpertKey, torch.Tensor]) -> dict[ExpertKey, torch.Tensor]:
        keys = sorted(groups)
        resident = [k for k in keys if self.cache.lookup(k) is not None]
        missing = [k for k in keys if k not in resident]
        call = _Call(self, set(resident), missing)
        call.start_loads()
        out = {}
        for key in resident:
            out[key] = self._compute(key, groups[key])
            call.done(key)
        for key in missing:
            call.wait(key)
            out[key] = self._compute(key, groups[key])
            call.done(key)
        return out

    def _compute(self, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.store.weights(self.cache.slot_of(key))
        return expert_ffn(x, w13, w2)

    def _submit(self, key: ExpertKey, slot: int) -> Future:
        self.cache.stats.bytes_loaded += self.store.nbytes
        if self._load_stream is None:
            return self._loader.submit(self.store.load, key, slot)
        # the slot may have just been freed by an expert whose compute is still queued
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.store.device))
        return self._loader.submit(self._load_on_stream, key, slot, ready)

    def _load_on_stream(self, key: ExpertKey, slot: int, ready: torch.cuda.Event) -> None:
        stream = self._load_stream
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            self.store.load(key, slot)
        stream.synchronize()

    def stats(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            **self.cache.stats.as_dict(),
            "host_resident": self.store.host_resident(),
        }
        if self.store.link is not None:
            out["link_seconds"] = self.store.link.seconds
        return out

    def close(self) -> None:
        self._loader.shutdown(wait=True)


class _Call:
    """Loads of one layer call: started as slots allow, waited for in order."""

    def __init__(self, backend: LocalExpertBackend, pinned: set[ExpertKey], missing: list) -> None:
        self.backend = backend
        self.pinned = pinned
        self.pending = list(missing)  # not yet given a slot, in order
        self.loads: dict[ExpertKey, Future] = {}

    def start_loads(self) -> None:
        while self.pending:
            slot = self.backend.cache.acquire(self.pending[0], self.pinned)
            if slot is None:
                return
            key = self.pending.pop(0)
            self.pinned.add(key)
            self.loads[key] = self.backend._submit(key, slot)

    def wait(self, key: ExpertKey) -> None:
        if key not in self.loads:
            self.start_loads()
        try:
            self.loads.pop(key).result()
        except BaseException:
            self.backend.cache.discard(key)  # its slot holds a partial copy
            raise

    def done(self, key: ExpertKey) -> None:
        self.pinned.discard(key)
        self.start_loads()
