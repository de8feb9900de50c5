"""The memory of the expert tiers: disk (memory-mapped safetensors), host RAM, device slots.

Each expert is packed into one contiguous buffer `[w1 | w3 | w2]` of the compute dtype, so a
move between tiers is one copy and w1, w3 read as one stacked (2F, D) matrix. The device tier is
a fixed pool of `capacity` such buffers, allocated once. The host tier (pinned RAM when the
device is a GPU) keeps packed buffers so that a re-load skips the disk and the dtype conversion;
on a CPU device it is off, since the device slots already are host RAM — unless a
`SimulatedLink` stands in for a PCIe bus, to measure offloading on a machine without a GPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from offload_rt.model.moe import ExpertKey


class ExpertSource(Protocol):
    """Where experts are read from: a checkpoint."""

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """w1 (F, D), w2 (D, F), w3 (F, D) as stored."""
        ...


@dataclass
class SimulatedLink:
    """A host->device link of `bytes_per_s`: every move into a device slot lasts at least
    bytes / bytes_per_s, so a CPU-only machine shows what a PCIe-bound GPU would."""

    bytes_per_s: float  # e.g. 16e9 for a PCIe 4.0 x16 link in practice
    seconds: float = 0.0  # transfer time charged so far

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"a simulated link needs a positive bandwidth, got {self.bytes_per_s}")

    def hold(self, nbytes: int, since: float) -> None:
        """Sleep until a move of `nbytes` begun at perf_counter() `since` has taken its time."""
        need = nbytes / self.bytes_per_s
        self.seconds += need
        left = need - (time.perf_counter() - since)
        if left > 0:
            time.sleep(left)


class StoreError(RuntimeError):
    """The tiers cannot be set up as asked (device memory, capacity)."""


class ExpertStore:
    def __init__(
        self,
        source: ExpertSource,
        hidden: int,
        intermediate: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int,
        host_capacity: int | None,
        link: SimulatedLink | None = None,
    ) -> None:
        self.source = source
        self.hidden = hidden
        self.intermediate = intermediate
        self.device = device
        self.dtype = dtype
        self.numel = 3 * hidden * intermediate
        self.nbytes = self.numel * dtype.itemsize
        self.pool = _allocate_pool(capacity, self.numel, device, dtype)  # (capacity, 3FD)
        f, d = intermediate, hidden
        # per slot: w13 (2F, D) and w2 (D, F) views, made once rather than on every use
        self._views = [
            (buf[: 2 * f * d].view(2 * f, d), buf[2 * f * d :].view(d, f)) for buf in self.pool
        ]
        self.host_capacity = host_capacity  # None: unbounded; 0: no host tier
        self._host: OrderedDict[ExpertKey, torch.Tensor] = OrderedDict()
        self._pin = device.type == "cuda"
        self.link = link

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one slot: w13 (2F, D) and w2 (D, F)."""
        return self._views[slot]

    def load(self, key: ExpertKey, slot: int) -> None:
        """Bring `key` into device slot `slot` (called from the loader thread)."""
        if self.host_capacity == 0:
            self._pack(key, self.pool[slot])
            return
        host = self._host_buffer(key)
        start = time.perf_counter()
        self.pool[slot].copy_(host, non_blocking=self._pin)
        if self.link is not None:
            self.link.hold(self.nbytes, start)

    def _host_buffer(self, key: ExpertKey) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is not None:
            self._host.move_to_end(key)
            return buf
        buf = torch.empty(self.numel, dtype=self.dtype, pin_memory=self._pin)
        self._pack(key, buf)
        if self.host_capacity is not None and len(self._host) >= self.host_capacity:
            self._host.popitem(last=False)
        self._host[key] = buf
        return buf

    def _pack(self, key: ExpertKey, out: torch.Tensor) -> None:
        """Read one expert from disk into `out` (3FD,), converting to the compute dtype."""
        w = self.source.expert(key.layer, key.expert)
        fd = self.hidden * self.intermediate
        out[:fd].copy_(w["w1"].reshape(-1))
        out[fd : 2 * fd].copy_(w["w3"].reshape(-1))
        out[2 * fd :].copy_(w["w2"].reshape(-1))

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
