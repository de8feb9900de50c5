"""From a checkpoint folder to a ready model: dense weights on the device, experts behind the
tiered store. Every check that can fail runs before anything is allocated on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from offload_rt.checkpoint import Checkpoint, router_tensor_name
from offload_rt.distributed.cluster import RayOptions
from offload_rt.experts import ExpertStore, LocalExpertBackend, OffloadOptions, SlotCache
from offload_rt.experts.quant import expert_nbytes
from offload_rt.experts.store import SimulatedLink
from offload_rt.model import AttentionWeights, DenseWeights, LayerWeights

if TYPE_CHECKING:
    from offload_rt.distributed.backend import RayExpertBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("local", "ray")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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


def load_dense(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> DenseWeights:
    def get(name: str) -> torch.Tensor:
        return ckpt.get(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(ckpt.config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
        attn = AttentionWeights(wqkv=torch.cat(qkv), wo=get(p + "self_attn.o_proj.weight"))
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                attn=attn,
                post_attn_norm=get(p + "post_attention_layernorm.weight"),
                router=get(router_tensor_name(i)),
            )
        )
    embed = get("model.embed_tokens.weight")
    lm_head = embed if ckpt.config.tie_word_embeddings else get("lm_head.weight")
    return DenseWeights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)


def local_backend(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    capacity: int,
    host_experts: int | None,
    link_gbps: float | None = None,
    options: OffloadOptions | None = None,
) -> LocalExpertBackend:
    cfg = ckpt.config
    # on a CPU device the slots are host RAM already: a host tier would hold every expert twice,
    # except where a simulated link plays the bus between host RAM and a device
    host = 0 if device.type == "cpu" and link_gbps is None else host_experts
    link = None if link_gbps is None else SimulatedLink(link_gbps * 1e9)
    store = ExpertStore(
        ckpt,
        cfg.hidden_size,
        cfg.intermediate_size,
        device,
        dtype,
        capacity,
        host,
        link,
        cfg.quantization,
    )
    return LocalExpertBackend(store, SlotCache(capacity), options or OffloadOptions())


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
            cfg.num_hidden_layers,
            cfg.num_local_experts,
            expert_nbytes(cfg, dtype),
            DTYPE_NAMES[dtype],
            opts,
        )
    except BaseException:
        if connected:
            ray.shutdown()
        raise
    return RayExpertBackend(cluster), ray.shutdown if connected else None
