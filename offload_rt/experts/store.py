"""The memory of the expert tiers: disk (memory-mapped safetensors), host RAM, device slots.

Each expert is packed into one contiguous buffer laid out by its `ExpertFormat` (`formats.py`:
float [gate | up | down], or a quantized codec's bytes), so a move between tiers is one copy;
the store never looks inside a buffer beyond asking the format for its views. The device
tier is a fixed pool of `capacity` such buffers, allocated once. The host tier (pinned RAM when the
device is a GPU) keeps packed buffers so that a re-load skips the disk and the dtype conversion;
on a CPU device it is off, since the device slots already are host RAM — unless a
`SimulatedLink` stands in for a PCIe bus, to measure offloading on a machine without a GPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from offload_rt.experts.formats import ExpertFormat
from offload_rt.model.ffn import ExpertFFN
from offload_rt.model.moe import ExpertKey


class ExpertSource(Protocol):
    """Where experts are read from: a checkpoint."""

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's parts as stored, by logical name (`Checkpoint.expert`)."""
        ...


@dataclass
class SimulatedLink:
    """A host->device link of `bytes_per_s`: every move into a device slot lasts at least
    bytes / bytes_per_s, so a CPU-only machine shows what a PCIe-bound GPU would."""

    bytes_per_s: float  # e.g. 16e9 for a PCIe 4.0 x16 link in practice
    seconds: float = 0.0  # transfer time charged so far
    free_at: float = 0.0  # perf_counter() when the exact link ends the moves it was given

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"a simulated link needs a positive bandwidth, got {self.bytes_per_s}")

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


def _nothing() -> None:
    return None


class StoreError(RuntimeError):
    """The tiers cannot be set up as asked (device memory, capacity)."""


class ExpertStore:
    def __init__(
        self,
        source: ExpertSource,
        fmt: ExpertFormat,
        device: torch.device,
        capacity: int,
        host_capacity: int | None,
        link: SimulatedLink | None = None,
    ) -> None:
        self.source = source
        self.format = fmt
        self.device = device
        self.storage_dtype = fmt.storage_dtype
        self.numel = fmt.numel  # of a packed expert, in storage_dtype elements
        self.nbytes = self.numel * self.storage_dtype.itemsize
        self.pool = _allocate_pool(capacity, self.numel, device, self.storage_dtype)
        # per slot: the format's views, made once
        self._views = [fmt.views(buf) for buf in self.pool]
        self.host_capacity = host_capacity  # None: unbounded; 0: no host tier
        self._host: OrderedDict[ExpertKey, torch.Tensor] = OrderedDict()
        self._pin = device.type == "cuda"
        self.link = link
        # a simulated link on a CPU device stands for a DMA engine, which costs link time but
        # no CPU: the slot takes the host buffer itself, where a memcpy would compete with
        # compute for the same cores and memory bandwidth (a 35 MB copy takes 1.5-4 ms on the
        # CI machine, about the 2.2 ms 16 GB/s allows, and slows a concurrent expert FFN 4x)
        self._bind = link is not None and device.type == "cpu"

    @property
    def splits(self) -> bool:
        """A load lands the up-projection's weights before the rest (`load`'s `landed`)."""
        return self.format.early_numel < self.numel

    def weights(self, slot: int) -> ExpertFFN:
        """One slot's expert, ready to compute (quantized: dequantized into the format's
        scratch, valid until the next call)."""
        return self.format.weights(self._views[slot])

    def load(
        self,
        key: ExpertKey,
        slot: int,
        landed: Callable[[], None] = _nothing,
        queued: float | None = None,
    ) -> None:
        """Bring `key` into device slot `slot` (called from the loader thread; `queued`: the
        perf_counter() when the load was asked for). Unquantized, w13 moves first and
        `landed()` is called once it is in the slot (on CUDA after the loader's stream has
        synchronised), so its matmul can start while w2 moves; quantized, or packed straight
        from disk, `landed()` comes with the whole."""
        if self.host_capacity == 0:
            self._pack(key, self.pool[slot])
            self._views[slot] = self.format.views(self.pool[slot])
            self._landed(0, 0.0, landed)
            return
        cached = queued is not None and key in self._host
        host = self._host_buffer(key)
        # a simulated link may start the move once the host buffer is ready: at once when
        # it was already in RAM, else after reading the disk
        ready = queued if cached else time.perf_counter()
        first = self.format.early_numel * self.storage_dtype.itemsize
        if self._bind:
            self._views[slot] = self.format.views(host)
        else:
            n = first // self.storage_dtype.itemsize
            self.pool[slot, :n].copy_(host[:n], non_blocking=self._pin)
        self._landed(first, ready, landed)
        if first < self.nbytes:
            if not self._bind:
                self.pool[slot, n:].copy_(host[n:], non_blocking=self._pin)
            if self.link is not None:
                self.link.hold(self.nbytes - first, ready)

    def _landed(self, nbytes: int, ready: float, landed: Callable[[], None]) -> None:
        """The first `nbytes` of a move whose data was ready at `ready` are in place: say so."""
        if self.link is not None and nbytes:
            self.link.hold(nbytes, ready)
        if self._pin:
            torch.cuda.current_stream(self.device).synchronize()
        landed()

    def host_weights(self, key: ExpertKey) -> ExpertFFN | None:
        """`key`'s expert in the host tier when the format computes from there, else None
        (read from the compute thread while the loader may change the tier: one dict lookup,
        no reordering)."""
        buf = self._host.get(key)
        if buf is None or not self.format.host_computable:
            return None
        return self.format.weights(self.format.views(buf))

    def _host_buffer(self, key: ExpertKey) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is not None:
            self._host.move_to_end(key)
            return buf
        buf = torch.empty(self.numel, dtype=self.storage_dtype, pin_memory=self._pin)
        self._pack(key, buf)
        if self.host_capacity is not None and len(self._host) >= self.host_capacity:
            self._host.popitem(last=False)
        self._host[key] = buf
        return buf

    def _pack(self, key: ExpertKey, out: torch.Tensor) -> None:
        """Read one expert from disk into `out` (numel,), as its format packs it."""
        self.format.pack(self.source.expert(key.layer, key.expert), out)

    def host_resident(self) -> int:
        return len(self._host)


def _allocate_pool(
    capacity: int, numel: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # torch.empty touches no page on the CPU: the pool costs RAM only as slots fill
    try:
        return torch.empty((capacity, numel), dtype=dtype, device=device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        need = capacity * numel * dtype.itemsize
        raise StoreError(
            f"cannot allocate {capacity} expert slots ({need / 2**30:.2f} GiB) on {device}: "
            f"lower cache_experts ({e})"
        ) from e
