"""The transport: packed experts moved from the host tier into device slots, off the compute
thread.

One worker thread is the link (`LinkLoader`: demand loads before prefetches). On CUDA each
move runs on the transport's own stream, after an event recorded on the compute stream (the
slot's previous expert may still be in use by queued kernels), from a pinned host buffer. How
the bytes cross is the `Link`'s: the device's own copy (`CopyLink`), or a `SimulatedLink` that
holds every move to bytes / bandwidth, so a CPU-only machine shows what a PCIe-bound GPU would.
A move lands the up-projection's weights first (the format's `early_numel`) and says so
(`Load.landed`), so their matmul can start while the rest still moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from offload_rt.experts.loader import LinkLoader
from offload_rt.experts.store import ExpertStore
from offload_rt.model.moe import ExpertKey


class Link(Protocol):
    """How a move's bytes cross from a host buffer into a device slot."""

    bytes_per_s: float | None  # known ahead (a simulated link); None: the loader measures it

    def move(
        self, store: ExpertStore, slot: int, host: torch.Tensor, start: int, stop: int, ready: float
    ) -> None:
        """host[start:stop] (storage elements) into `slot`; the data was ready at
        perf_counter() `ready`."""
        ...

    def stats(self) -> dict[str, float]: ...


class CopyLink:
    """The device's own link: a copy (non-blocking from pinned memory, on CUDA)."""

    bytes_per_s = None

    def move(
        self, store: ExpertStore, slot: int, host: torch.Tensor, start: int, stop: int, ready: float
    ) -> None:
        store.copy(slot, host, start, stop)

    def stats(self) -> dict[str, float]:
        return {}


@dataclass
class SimulatedLink:
    """A host->device link of `bytes_per_s`: every move into a device slot lasts at least
    bytes / bytes_per_s. On a CPU device it stands for a DMA engine, which costs link time but
    no CPU: the slot takes the host buffer itself, where a memcpy would compete with compute
    for the same cores and memory bandwidth (a 35 MB copy takes 1.5-4 ms on the CI machine,
    about the 2.2 ms 16 GB/s allows, and slows a concurrent expert FFN 4x)."""

    bytes_per_s: float  # e.g. 16e9 for a PCIe 4.0 x16 link in practice
    seconds: float = 0.0  # transfer time charged so far
    free_at: float = 0.0  # perf_counter() when the exact link ends the moves it was given

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"a simulated link needs a positive bandwidth, got {self.bytes_per_s}")

    def move(
        self, store: ExpertStore, slot: int, host: torch.Tensor, start: int, stop: int, ready: float
    ) -> None:
        if store.device.type != "cpu":
            store.copy(slot, host, start, stop)
        elif start == 0:
            store.bind(slot, host)
        self.hold((stop - start) * host.element_size(), ready)

    def hold(self, nbytes: int, ready: float) -> None:
        """Sleep until a move of `nbytes`, whose data was ready at perf_counter() `ready`,
        ends on an exact link: one that starts it once it is ready and the link has ended its
        previous move. A sleep overshoots (about 70 µs on the CI machine) and the worker
        takes a while to pick up the next move: both delay this move's end as seen, but not
        the exact link's clock, so moves queued back to back keep the link's rate."""
        need = nbytes / self.bytes_per_s
        self.seconds += need
        self.free_at = max(ready, self.free_at) + need
        left = self.free_at - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def stats(self) -> dict[str, float]:
        return {"link_seconds": self.seconds}


@dataclass(frozen=True)
class Load:
    """One expert's move into its slot."""

    future: Future  # done when the whole expert is in place (or the move failed, or was cancelled)
    landed: Future  # done when its early part (the up-projection's weights) is in place


class Transport:
    def __init__(self, store: ExpertStore, link: Link | None = None) -> None:
        self.store = store
        self.link: Link = link if link is not None else CopyLink()
        self.loader = LinkLoader(self.link.bytes_per_s)
        cuda = store.device.type == "cuda"
        self._stream = torch.cuda.Stream(store.device) if cuda else None

    def submit(self, key: ExpertKey, slot: int, urgent: bool) -> Load:
        """Queue `key`'s move into `slot`; urgent (a layer waits for it) goes before every
        prefetch."""
        landed: Future = Future()
        mark, queued = partial(landed.set_result, None), time.perf_counter()
        if self._stream is None:
            job = partial(self._move, key, slot, mark, queued)
        else:  # the slot may have just been freed by an expert whose compute is still queued
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.store.device))
            job = partial(self._move_on_stream, key, slot, ready, mark, queued)
        return Load(self.loader.submit(job, self.store.nbytes, urgent), landed)

    def eta(self, future: Future | None, nbytes: int) -> float | None:
        """`LinkLoader.eta`: seconds until `future` ends, or a new urgent move of `nbytes`."""
        return self.loader.eta(future, nbytes=nbytes)

    def close(self) -> None:
        self.loader.close()

    def _move_on_stream(
        self,
        key: ExpertKey,
        slot: int,
        ready: torch.cuda.Event,
        landed: Callable[[], None],
        queued: float,
    ) -> None:
        stream = self._stream
        assert stream is not None
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            self._move(key, slot, landed, queued)
        stream.synchronize()

    def _move(self, key: ExpertKey, slot: int, landed: Callable[[], None], queued: float) -> None:
        """On the loader thread (`queued`: the perf_counter() when the move was asked for).
        Unquantized, the early part moves first and `landed()` is called once it is in the
        slot (on CUDA after the stream has synchronised); quantized, or packed straight from
        disk, `landed()` comes with the whole."""
        store = self.store
        if not store.has_host_tier:
            store.pack(key, slot)
            self._landed(landed)
            return
        host, cached = store.host_buffer(key)
        # the link may start the move once the host buffer is ready: at once when it was
        # already in RAM, else after reading the disk
        ready = queued if cached else time.perf_counter()
        early, whole = store.format.early_numel, store.numel
        self.link.move(store, slot, host, 0, early, ready)
        self._landed(landed)
        if early < whole:
            self.link.move(store, slot, host, early, whole, ready)

    def _landed(self, landed: Callable[[], None]) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.store.device).synchronize()
        landed()
