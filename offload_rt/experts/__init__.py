"""Where experts live on one machine: the tiered store, the device cache, the local backend."""

from offload_rt.experts.backend import LocalExpertBackend, OffloadOptions
from offload_rt.experts.cache import CacheStats, SlotCache
from offload_rt.experts.store import ExpertStore, StoreError

__all__ = [
    "CacheStats",
    "ExpertStore",
    "LocalExpertBackend",
    "OffloadOptions",
    "SlotCache",
    "StoreError",
]
