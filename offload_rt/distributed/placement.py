"""Placement of every (layer, expert) on the expert actors of a Ray cluster.

Actors: one per GPU, or one per node without GPUs (a CPU actor computes in host RAM); with an
explicit count, actors are dealt round-robin over the nodes, so actors 0, 1, 2... land on
distinct nodes. A node's host RAM is shared equally by its actors.

Capacity, in experts: a GPU actor holds `gpu memory // expert_bytes` experts on its device
(the LRU cache) and spills `host share // expert_bytes` more to host RAM; a CPU actor's device
is its host share. Experts first fill device slots, then host slots, each time going to the
actor whose tier is least full in proportion (ties: lowest index). The experts each actor then
receives are dealt by a smooth weighted round-robin over (layer, expert) order, so one layer's
experts sit on several actors and its calls run at once. Pure: no Ray, same input, same plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

from offload_rt.grid import ExpertGrid, ExpertKey

GiB = 2**30
# a 24 GiB consumer GPU less 2 GiB for the CUDA context, activations and the allocator's slack
DEFAULT_GPU_MEMORY_BYTES = 22 * GiB
# of a node's Ray "memory": the rest stays for the object store, the OS and the checkpoint's pages
DEFAULT_HOST_FRACTION = 0.5
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RAY_BUILTIN_PREFIXES = ("node:", "accelerator_type:")


class PlacementError(ValueError):
    """The experts cannot be placed on the given nodes or actors."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str  # Ray node id (hex)
    address: str  # node's IP address
    num_gpus: int  # GPUs on the node; 0: its experts run on the CPU
    gpu_memory_bytes: int  # per GPU, usable for experts
    host_memory_bytes: int  # RAM usable for experts, shared by the node's actors
    resources: Mapping[str, float] = field(default_factory=dict)  # custom Ray resources


@dataclass(frozen=True)
class ActorPlan:
    index: int  # position in the plan
    name: str  # Ray actor name, f"expert-{index}", in the offload_rt namespace
    node_id: str  # node the actor is pinned to
    address: str  # that node's IP address
    device: str  # "cuda": one GPU; "cpu": experts computed in host RAM
    experts: tuple[ExpertKey, ...]  # experts the actor hosts, ascending
    device_slots: int  # experts on the device at once: the LRU cache capacity
    host_bytes: int  # host RAM for the experts beyond the device slots
    expected_resident_fraction: float  # device_slots / len(experts); 1.0 when it has none
    device_memory_bytes: int  # device memory usable for experts (a CPU actor's host share)
    host_memory_bytes: int  # host RAM usable for spilled experts (0 on a CPU actor)

    @property
    def host_slots(self) -> int:
        """Experts beyond the device slots, held in host RAM."""
        return len(self.experts) - self.device_slots


@dataclass(frozen=True)
class PlacementPlan:
    actors: tuple[ActorPlan, ...]  # ascending index; after a replan, only the survivors
    grid: ExpertGrid  # the MoE layers and their experts
    expert_bytes: int  # bytes of one packed expert (compute dtype, or its quantized parts)

    @cached_property
    def _owners(self) -> dict[ExpertKey, ActorPlan]:
        return {key: actor for actor in self.actors for key in actor.experts}

    def owner(self, key: ExpertKey) -> ActorPlan:
        actor = self._owners.get(key)
        if actor is None:
            raise KeyError(f"{key} is not in the plan ({self.grid.describe()})")
        return actor

    def group_by_actor(self, keys: Iterable[ExpertKey]) -> dict[int, list[ExpertKey]]:
        """Actor index -> its keys among `keys`, ascending: one call per actor."""
        out: dict[int, list[ExpertKey]] = {}
        for key in sorted(keys):
            out.setdefault(self.owner(key).index, []).append(key)
        return out

    def format(self) -> str:
        """A table of the actors, for `offload-rt plan`."""
        total = sum(len(a.experts) for a in self.actors)
        resident = sum(a.device_slots for a in self.actors) / max(total, 1)
        title = (
            f"{total} experts ({self.grid.describe()}) of "
            f"{_human(self.expert_bytes)} on {len(self.actors)} actors; "
            f"expected resident fraction {resident:.2f}"
        )
        head = ["actor", "node", "address", "device", "experts", "bytes", "device slots"]
        rows = [head + ["host bytes", "resident"]] + [
            _row(a, self.expert_bytes) for a in self.actors
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) + 2)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([title, *lines])


def _row(a: ActorPlan, expert_bytes: int) -> list[str]:
    return [
        a.name,
        a.node_id[:12],
        a.address,
        a.device,
        str(len(a.experts)),
        _human(len(a.experts) * expert_bytes),
        str(a.device_slots),
        _human(a.host_bytes),
        f"{a.expected_resident_fraction:.2f}",
    ]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- planning


@dataclass(frozen=True)
class _Slot:
    """Where one actor runs and the memory it may use, before experts are assigned."""

    node_id: str
    address: str
    device: str
    device_memory_bytes: int
    host_memory_bytes: int


@dataclass(frozen=True)
class _Capacity:
    device: int  # experts that fit on the device
    host: int  # experts that fit in host RAM beyond them
    leftover_bytes: int  # memory left when both tiers are full: less than one expert


def plan_placement(
    nodes: Sequence[NodeInfo],
    grid: ExpertGrid,
    expert_bytes: int,
    expert_actors: int | None = None,
) -> PlacementPlan:
    """Assign every expert of `grid` to one actor. expert_actors None: one per GPU, or one per
    node without GPUs. expert_bytes: one expert in the compute dtype (3 F D itemsize)."""
    _check_inputs(nodes, expert_bytes)
    slots = _actor_slots(sorted(nodes, key=lambda n: n.node_id), expert_actors)
    keys = list(grid.keys())
    caps = [_capacity(s, expert_bytes) for s in slots]
    placed = _place(keys, caps, [0] * len(slots), expert_bytes)
    actors = tuple(
        _actor_plan(i, s, ks, expert_bytes) for i, (s, ks) in enumerate(zip(slots, placed))
    )
    return PlacementPlan(actors, grid, expert_bytes)


def replan(plan: PlacementPlan, surviving_actor_indices: Iterable[int]) -> PlacementPlan:
    """Place the experts of actors that are gone on the survivors, within their memory.
    Survivors keep their experts (and their index and name); only the orphans move."""
    keep = set(surviving_actor_indices)
    known = [a.index for a in plan.actors]
    unknown = sorted(keep - set(known))
    if unknown:
        raise PlacementError(f"actors {unknown} are not in the plan (actors {known})")
    survivors = [a for a in plan.actors if a.index in keep]
    orphans = sorted(k for a in plan.actors if a.index not in keep for k in a.experts)
    slots = [_slot_of(a) for a in survivors]
    caps = [_capacity(s, plan.expert_bytes) for s in slots]
    held = [len(a.experts) for a in survivors]
    placed = _place(orphans, caps, held, plan.expert_bytes)
    actors = tuple(
        _actor_plan(a.index, s, [*a.experts, *new], plan.expert_bytes)
        for a, s, new in zip(survivors, slots, placed)
    )
    return PlacementPlan(actors, plan.grid, plan.expert_bytes)


def _check_inputs(nodes: Sequence[NodeInfo], expert_bytes: int) -> None:
    if expert_bytes < 1:
        raise PlacementError(f"expert_bytes must be positive, got {expert_bytes}")
    if not nodes:
        raise PlacementError("no alive nodes to place experts on")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise PlacementError(f"node ids repeat: {sorted(ids)}")
    for n in nodes:
        for name in ("num_gpus", "gpu_memory_bytes", "host_memory_bytes"):
            if getattr(n, name) < 0:
                raise PlacementError(f"node {n.node_id}: {name} is negative ({getattr(n, name)})")


def _actor_slots(nodes: list[NodeInfo], expert_actors: int | None) -> list[_Slot]:
    per_node = _actors_per_node(nodes, expert_actors)
    # dealt in rounds over the nodes, so that the first actors land on distinct nodes
    order = [(r, i) for r in range(max(per_node)) for i in range(len(nodes)) if r < per_node[i]]
    return [_slot(nodes[i], per_node[i]) for _, i in order]


def _actors_per_node(nodes: list[NodeInfo], expert_actors: int | None) -> list[int]:
    if expert_actors is None:
        return [n.num_gpus or 1 for n in nodes]
    if expert_actors < 1:
        raise PlacementError(f"expert_actors must be positive or None, got {expert_actors}")
    # a GPU node takes one actor per GPU; a node without GPUs as many CPU actors as dealt
    limits = [n.num_gpus or expert_actors for n in nodes]
    if sum(limits) < expert_actors:
        raise PlacementError(
            f"expert_actors={expert_actors} exceeds the {sum(limits)} GPUs of the cluster "
            "(every node has GPUs, and an actor takes one whole GPU)"
        )
    per_node = [0] * len(nodes)
    while sum(per_node) < expert_actors:
        for i in range(len(nodes)):
            if per_node[i] < limits[i] and sum(per_node) < expert_actors:
                per_node[i] += 1
    return per_node


def _slot(node: NodeInfo, actors_on_node: int) -> _Slot:
    share = node.host_memory_bytes // actors_on_node
    if node.num_gpus:
        return _Slot(node.node_id, node.address, "cuda", node.gpu_memory_bytes, share)
    return _Slot(node.node_id, node.address, "cpu", share, 0)


def _slot_of(a: ActorPlan) -> _Slot:
    return _Slot(a.node_id, a.address, a.device, a.device_memory_bytes, a.host_memory_bytes)


def _capacity(slot: _Slot, expert_bytes: int) -> _Capacity:
    device, device_left = divmod(slot.device_memory_bytes, expert_bytes)
    host, host_left = divmod(slot.host_memory_bytes, expert_bytes)
    return _Capacity(device, host, device_left + host_left)


def _actor_plan(
    index: int, slot: _Slot, experts: Sequence[ExpertKey], expert_bytes: int
) -> ActorPlan:
    cap = _capacity(slot, expert_bytes)
    device_slots = min(len(experts), cap.device)
    return ActorPlan(
        index=index,
        name=f"expert-{index}",
        node_id=slot.node_id,
        address=slot.address,
        device=slot.device,
        experts=tuple(sorted(experts)),
        device_slots=device_slots,
        host_bytes=(len(experts) - device_slots) * expert_bytes,
        expected_resident_fraction=device_slots / len(experts) if experts else 1.0,
        device_memory_bytes=slot.device_memory_bytes,
        host_memory_bytes=slot.host_memory_bytes,
    )


def _place(
    keys: list[ExpertKey], caps: list[_Capacity], held: list[int], expert_bytes: int
) -> list[list[ExpertKey]]:
    """New keys per actor, given the experts each already holds."""
    free = sum(c.device + c.host - h for c, h in zip(caps, held))
    if free < len(keys):
        raise _no_room(keys[free], caps, expert_bytes)
    return _interleave(keys, _apportion(len(keys), caps, held))


def _no_room(key: ExpertKey, caps: list[_Capacity], expert_bytes: int) -> PlacementError:
    most = max((c.leftover_bytes for c in caps), default=0)
    total = sum(c.leftover_bytes for c in caps)
    if not caps:
        return PlacementError(f"cannot place {key}: no actors are left to hold experts")
    return PlacementError(
        f"cannot place {key}: it needs {expert_bytes} bytes ({_human(expert_bytes)}), but with "
        f"device and host memory full the most free on one actor is {most} bytes, split "
        f"between its device and host memory, neither of which has room for a whole expert "
        f"({total} bytes free over {len(caps)} actors)"
    )


def _apportion(count: int, caps: list[_Capacity], held: list[int]) -> list[int]:
    """How many of `count` new experts each actor takes: device tiers first, then host."""
    total = list(held)
    for _ in range(count):
        total[_least_full(total, caps)] += 1
    return [t - h for t, h in zip(total, held)]


def _least_full(total: list[int], caps: list[_Capacity]) -> int:
    device = [i for i, c in enumerate(caps) if total[i] < c.device]
    if device:
        return min(device, key=lambda i: (Fraction(total[i] + 1, caps[i].device), i))
    host = [i for i, c in enumerate(caps) if total[i] < c.device + c.host]
    return min(host, key=lambda i: (Fraction(total[i] - caps[i].device + 1, caps[i].host), i))


def _interleave(keys: list[ExpertKey], counts: list[int]) -> list[list[ExpertKey]]:
    """Smooth weighted round-robin: actor i gets exactly counts[i] keys, spread over the order."""
    out: list[list[ExpertKey]] = [[] for _ in counts]
    current = [0] * len(counts)
    for key in keys:
        current = [c + w for c, w in zip(current, counts)]
        pick = max(range(len(counts)), key=lambda i: (current[i], -i))
        current[pick] -= len(keys)
        out[pick].append(key)
    return out


# ---- from Ray


def nodes_from_ray(
    ray_nodes: list[dict[str, Any]],
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY_BYTES,
    host_fraction: float = DEFAULT_HOST_FRACTION,
) -> list[NodeInfo]:
    """`ray.nodes()` -> NodeInfo of the alive nodes, by node id. gpu_memory_bytes: usable per
    GPU (Ray does not report it); host_fraction: share of a node's Ray "memory" for experts."""
    if not 0 < host_fraction <= 1:
        raise PlacementError(f"host_fraction must be in (0, 1], got {host_fraction}")
    alive = [d for d in ray_nodes if d.get("Alive", False)]
    nodes = [_node_from_ray(d, gpu_memory_bytes, host_fraction) for d in alive]
    return sorted(nodes, key=lambda n: n.node_id)


def _node_from_ray(d: dict[str, Any], gpu_memory_bytes: int, host_fraction: float) -> NodeInfo:
    missing = [k for k in ("NodeID", "NodeManagerAddress", "Resources") if k not in d]
    if missing:
        raise PlacementError(f"ray node entry lacks {missing} (keys {sorted(d)})")
    res = d["Resources"]
    gpus = int(res.get("GPU", 0))  # a fractional GPU is not one an actor can own
    return NodeInfo(
        node_id=d["NodeID"],
        address=d["NodeManagerAddress"],
        num_gpus=gpus,
        gpu_memory_bytes=gpu_memory_bytes if gpus else 0,
        host_memory_bytes=int(res.get("memory", 0) * host_fraction),
        resources={k: float(v) for k, v in sorted(res.items()) if _is_custom(k)},
    )


def _is_custom(resource: str) -> bool:
    builtin = resource in _RAY_BUILTIN_RESOURCES or resource.startswith(_RAY_BUILTIN_PREFIXES)
    return not builtin
