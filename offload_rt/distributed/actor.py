"""The expert actor: one process per GPU (or CPU slot) serving a set of experts.

It hosts the same tiered store and LRU device cache as the local backend, reading experts from
the checkpoint path on its own machine, and answers one wire-encoded request per layer call.
It holds no state a retry could corrupt: a call is a pure function of its request, so the
coordinator may resend it after a restart. Ray applies `ray.remote` to this class at spawn
time (`distributed/cluster.py`); the class itself does not import ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from offload_rt.distributed.frames import decode_groups, pack_groups
from offload_rt.distributed.graph import NOTHING
from offload_rt.dtypes import DTYPES
from offload_rt.experts import ExpertStore, LocalExpertBackend, SlotCache
from offload_rt.experts.formats import expert_format
from offload_rt.models import open_checkpoint


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs to (re)start: Ray passes it again on every restart."""

    checkpoint: str  # checkpoint folder, as seen on the actor's node
    device: str  # "cuda" or "cpu"
    dtype: str  # compute dtype name
    device_slots: int  # experts resident on the device at once (its LRU capacity)
    host_experts: int | None  # packed experts kept in host RAM (GPU actors); None: all
    threads: int  # torch intra-op threads: the CPUs Ray granted this actor


class ExpertActor:
    def __init__(self, spec: ActorSpec) -> None:
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.checkpoint = open_checkpoint(spec.checkpoint)
        cfg = self.checkpoint.config
        device = torch.device(spec.device)
        host = 0 if device.type == "cpu" else spec.host_experts
        fmt = expert_format(cfg, device, DTYPES[spec.dtype])
        store = ExpertStore(self.checkpoint, fmt, device, spec.device_slots, host)
        self.backend = LocalExpertBackend(store, SlotCache(spec.device_slots), cfg.grid)
        self.device = device
        self.calls = 0

    def run(self, *frames: bytes) -> bytes | tuple[bytes, ...]:
        """One layer's groups for this actor's experts: a wire request in, in one or more
        frames; the response out, in as many frames (the caller's `num_returns`)."""
        groups = decode_groups("request", frames)
        if self.device.type != "cpu":
            groups = {k: x.to(self.device) for k, x in groups.items()}
        with torch.inference_mode():
            outputs = self.backend.run(groups)
        self.calls += 1
        out = pack_groups("response", outputs).frames(len(frames))
        return out[0] if len(out) == 1 else tuple(out)

    def run_graph(self, request: bytes) -> bytes:
        """`run` as a node of the compiled graph that spans every actor (`distributed/graph.py`):
        the whole request in one bytes object, or `graph.NOTHING` when this layer needs none of
        this actor's experts (the graph calls every actor every time); the response likewise."""
        return request if request == NOTHING else self.run(request)

    def info(self) -> dict[str, object]:
        """Identity for operators and tests: process, node, device, calls served."""
        import ray  # only inside an actor, where ray is running

        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "device": str(self.device),
            "calls": self.calls,
        }

    def stats(self) -> dict[str, int]:
        return self.backend.stats()

    def ping(self) -> bool:
        return True
