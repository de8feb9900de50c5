"""The memory of the expert tiers: disk (memory-mapped safetensors), host RAM, device slots.

Each expert is packed into one contiguous buffer laid out by its `ExpertFormat` (`formats.py`:
float [gate | up | down], or a quantized codec's bytes), so a move between tiers is one copy;
the store never looks inside a buffer beyond asking the format for its views. The device
tier is a fixed pool of `capacity` such buffers, allocated once. The host tier (pinned RAM when the
device is a GPU) keeps packed buffers so that a re-load skips the disk and the dtype conversion;
on a CPU device it is off, since the device slots already are host RAM — unless a
`SimulatedLink` (`transport.py`) stands in for a PCIe bus, to measure offloading on a machine
without a GPU. The store holds the memory; the transport moves experts between the tiers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from offload_rt.experts import hugepages
from offload_rt.experts.formats import ExpertFormat
from offload_rt.model.ffn import ExpertFFN
from offload_rt.model.moe import ExpertKey


class ExpertSource(Protocol):
    """Where experts are read from: a checkpoint."""

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's parts as stored, by logical name (`Checkpoint.expert`)."""
        ...


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
    ) -> None:
        self.source = source
        self.format = fmt
        self.device = device
        self.storage_dtype = fmt.storage_dtype
        self.numel = fmt.numel  # of a packed expert, in storage_dtype elements
        self.nbytes = self.numel * self.storage_dtype.itemsize
        self.pool = _allocate_pool(capacity, self.numel, device, self.storage_dtype)
        # per slot: the format's views, made once; and its expert where the format's stays
        # valid across calls (`stable_weights`), made at first use
        self._views = [fmt.views(buf) for buf in self.pool]
        self._ffns: list[ExpertFFN | None] = [None] * capacity
        self.host_capacity = host_capacity  # None: unbounded; 0: no host tier
        self._host: OrderedDict[ExpertKey, torch.Tensor] = OrderedDict()
        self._pin = device.type == "cuda"
        # the CPU set's experts (`hold`): read once, kept for the store's life, never evicted
        self._held: dict[ExpertKey, ExpertFFN] = {}

    @property
    def splits(self) -> bool:
        """A move lands the up-projection's weights before the rest (`Transport`)."""
        return self.format.early_numel < self.numel

    @property
    def has_host_tier(self) -> bool:
        return self.host_capacity != 0

    def weights(self, slot: int) -> ExpertFFN:
        """One slot's expert, ready to compute (quantized: dequantized into the format's
        scratch, valid until the next call)."""
        if not self.format.stable_weights:
            return self.format.weights(self._views[slot])
        ffn = self._ffns[slot]
        if ffn is None:
            ffn = self._ffns[slot] = self.format.weights(self._views[slot])
        return ffn

    def pack(self, key: ExpertKey, slot: int) -> None:
        """Read `key` from disk straight into device slot `slot` (no host tier)."""
        self.format.pack(self.source.expert(key.layer, key.expert), self.pool[slot])
        self._ffns[slot] = None
        self._views[slot] = self.format.views(self.pool[slot])

    def copy(self, slot: int, host: torch.Tensor, start: int, stop: int) -> None:
        """host[start:stop] into the same elements of slot `slot` (non-blocking from pinned
        memory, on the current stream)."""
        self.pool[slot, start:stop].copy_(host[start:stop], non_blocking=self._pin)

    def bind(self, slot: int, host: torch.Tensor) -> None:
        """Slot `slot` computes from the host buffer itself (a CPU device: no copy)."""
        self._ffns[slot] = None
        self._views[slot] = self.format.views(host)

    def hold(self, key: ExpertKey) -> ExpertFFN:
        """`key`'s expert to compute on the CPU, from a host buffer of its own outside the
        host tier's LRU: read from disk on first use and kept (unpinned: it never crosses
        the link). Called from the compute thread only."""
        ffn = self._held.get(key)
        if ffn is None:
            buf = hugepages.empty((self.numel,), self.storage_dtype)
            self.format.pack(self.source.expert(key.layer, key.expert), buf)
            ffn = self._held[key] = self.format.host_ffn(buf)
        return ffn

    @property
    def held(self) -> int:
        """Experts held for the CPU set."""
        return len(self._held)

    def host_buffer(self, key: ExpertKey) -> tuple[torch.Tensor, bool]:
        """`key`'s packed buffer in the host tier, read from disk if it was not there (then
        possibly evicting the least recent); and whether it was there."""
        buf = self._host.get(key)
        if buf is not None:
            self._host.move_to_end(key)
            return buf, True
        if self._pin:
            buf = torch.empty(self.numel, dtype=self.storage_dtype, pin_memory=True)
        else:
            buf = hugepages.empty((self.numel,), self.storage_dtype)
        self.format.pack(self.source.expert(key.layer, key.expert), buf)
        if self.host_capacity is not None and len(self._host) >= self.host_capacity:
            self._host.popitem(last=False)
        self._host[key] = buf
        return buf, False

    def host_weights(self, key: ExpertKey) -> ExpertFFN | None:
        """`key`'s expert in the host tier, to compute on the CPU, else None (read from the
        compute thread while the loader may change the tier: one dict lookup, no
        reordering)."""
        buf = self._host.get(key)
        return None if buf is None else self.format.host_ffn(buf)

    def host_buffers(self) -> list[torch.Tensor]:
        """The host tier's packed buffers, least recent first."""
        return list(self._host.values())


def _allocate_pool(
    capacity: int, numel: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # torch.empty touches no page on the CPU: the pool costs RAM only as slots fill (on huge
    # pages where Linux offers them: `hugepages.py`)
    try:
        if device.type == "cpu":
            return hugepages.empty((capacity, numel), dtype)
        return torch.empty((capacity, numel), dtype=dtype, device=device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        need = capacity * numel * dtype.itemsize
        raise StoreError(
            f"cannot allocate {capacity} expert slots ({need / 2**30:.2f} GiB) on {device}: "
            f"lower cache_experts ({e})"
        ) from e
