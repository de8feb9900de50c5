"""The loads in flight, by expert, as the layer calls see them.

A load is started into a slot the cache has given, waited for (the time counted), and forgotten
once a call has seen it end. A load that failed or was cancelled leaves its expert missing and
its slot free (it may hold a partial copy), so no half-loaded expert is ever used.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future

from offload_rt.experts.cache import SlotCache
from offload_rt.experts.transport import Load, Transport
from offload_rt.model.moe import ExpertKey


class LoadTable:
    def __init__(self, transport: Transport, cache: SlotCache) -> None:
        self.transport = transport
        self.cache = cache
        self._loads: dict[ExpertKey, Load] = {}  # loads whose end no layer call has seen
        self.wait_seconds = 0.0  # time layer calls spent waiting for loads

    def start(self, key: ExpertKey, slot: int, urgent: bool) -> Load:
        self.cache.stats.bytes_loaded += self.transport.store.nbytes
        load = self._loads[key] = self.transport.submit(key, slot, urgent)
        return load

    def __contains__(self, key: ExpertKey) -> bool:
        """`key` has a load no layer call has seen end (it may have ended)."""
        return key in self._loads

    def future(self, key: ExpertKey) -> Future:
        return self._loads[key].future

    def in_flight(self) -> set[ExpertKey]:
        return {key for key, load in self._loads.items() if not load.future.done()}

    def cancel(self, key: ExpertKey, future: Future) -> bool:
        """Drop `key`'s load `future` if it has not started, and its slot."""
        if not self.transport.loader.cancel(future):
            return False
        self._loads.pop(key, None)
        self.cache.discard(key)
        self.cache.stats.bytes_loaded -= self.transport.store.nbytes
        return True

    def reap(self) -> None:
        """Forget finished loads; a failed one leaves its expert missing, to be loaded again."""
        for key, load in list(self._loads.items()):
            if load.future.done():
                del self._loads[key]
                if load.future.cancelled() or load.future.exception() is not None:
                    self.cache.discard(key)

    def settle(self) -> None:
        """Wait until every load in flight has finished (their experts stay resident)."""
        concurrent.futures.wait([load.future for load in self._loads.values()])
        self.reap()

    def wait(self, key: ExpertKey) -> None:
        """Wait for `key`'s whole load; its error, if it failed (the expert then missing)."""
        future = self._loads[key].future
        start = time.perf_counter()
        try:
            future.result()
        except BaseException:
            self._loads.pop(key, None)
            self.cache.discard(key)  # its slot holds a partial copy
            raise
        finally:
            self.wait_seconds += time.perf_counter() - start
        self._loads.pop(key, None)

    def wait_landed(self, key: ExpertKey) -> bool:
        """Wait until `key`'s early part has landed or its load has ended; whether it landed."""
        load = self._loads[key]
        if not load.landed.done():
            start = time.perf_counter()
            first = concurrent.futures.FIRST_COMPLETED
            concurrent.futures.wait([load.landed, load.future], return_when=first)
            self.wait_seconds += time.perf_counter() - start
        return load.landed.done()

    def wait_any(self) -> None:
        """Block until some load in flight ends (its slot can then be taken)."""
        futures = [load.future for load in self._loads.values() if not load.future.done()]
        if not futures:
            raise RuntimeError("no expert slot can be freed: every slot is pinned by this call")
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
