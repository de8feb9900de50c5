"""From a checkpoint folder to a ready model's parts: the expert backend (local tiers or Ray
actors), and the arguments `load` resolves. Every check that can fail runs before anything is
allocated on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from offload_rt.checkpoint import Checkpoint
from offload_rt.distributed.cluster import RayOptions
from offload_rt.dtypes import DTYPE_NAMES, DTYPES
from offload_rt.experts import ExpertStore, LocalExpertBackend, OffloadOptions, SlotCache
from offload_rt.experts.formats import expert_format, expert_nbytes
from offload_rt.experts.policies import DEFAULT_POLICY, runtime_policy
from offload_rt.experts.transport import SimulatedLink

if TYPE_CHECKING:
    from offload_rt.distributed.backend import RayExpertBackend

BACKENDS = ("local", "ray")


def resolve_dtype(dtype: str | torch.dtype | None, ckpt: Checkpoint) -> torch.dtype:
    if dtype is None:
        return ckpt.dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_capacity(cache_experts: int | None, total: int) -> int:
    if cache_experts is None:
        return total
    if isinstance(cache_experts, bool) or not isinstance(cache_experts, int) or cache_experts < 1:
        raise ValueError(f"cache_experts must be a positive integer, got {cache_experts!r}")
    return min(cache_experts, total)


def local_backend(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    capacity: int,
    host_experts: int | None,
    link_gbps: float | None = None,
    options: OffloadOptions | None = None,
    cache_policy: str = DEFAULT_POLICY,
) -> LocalExpertBackend:
    cfg = ckpt.config
    # on a CPU device the slots are host RAM already: a host tier would hold every expert twice,
    # except where a simulated link plays the bus between host RAM and a device
    host = 0 if device.type == "cpu" and link_gbps is None else host_experts
    link = None if link_gbps is None else SimulatedLink(link_gbps * 1e9)
    fmt = expert_format(cfg, device, dtype)
    store = ExpertStore(ckpt, fmt, device, capacity, host)
    cache = SlotCache(capacity, runtime_policy(cache_policy, len(cfg.grid.layers)))
    return LocalExpertBackend(store, cache, cfg.grid, options or OffloadOptions(), link)


def ray_backend(
    ckpt: Checkpoint, dtype: torch.dtype, opts: RayOptions
) -> tuple[RayExpertBackend, Callable[[], None] | None]:
    """Expert actors placed over the Ray cluster; returns the backend and what closing the
    model must do besides (disconnect from Ray when this call connected)."""
    import ray

    from offload_rt.distributed.backend import RayExpertBackend
    from offload_rt.distributed.cluster import ExpertCluster, join_ray

    connected = join_ray(opts.address)
    cfg = ckpt.config
    try:
        cluster = ExpertCluster.start(
            str(ckpt.folder.resolve()),
            cfg.grid,
            expert_nbytes(cfg, dtype),
            DTYPE_NAMES[dtype],
            opts,
        )
    except BaseException:
        if connected:
            ray.shutdown()
        raise
    return RayExpertBackend(cluster), ray.shutdown if connected else None
