"""Tier 1: the placement planner: memory held, every expert once, deterministic, spread, replan."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from offload_rt.distributed.placement import (
    GiB,
    NodeInfo,
    PlacementError,
    PlacementPlan,
    nodes_from_ray,
    plan_placement,
    replan,
)
from offload_rt.grid import ExpertGrid
from offload_rt.model import ExpertKey

EB = 100  # bytes of one expert in the small clusters below


def grid(layers: int, experts: int) -> ExpertGrid:
    """Every decoder layer MoE, as in Mixtral."""
    return ExpertGrid(tuple(range(layers)), experts)


def gpu_node(name: str, gpus: int = 1, slots: int = 10, host_slots: int = 10, **res) -> NodeInfo:
    return NodeInfo(name, f"10.0.0.{name[-1]}", gpus, slots * EB, host_slots * EB, res)


def cpu_node(name: str, host_slots: int = 10) -> NodeInfo:
    return NodeInfo(name, f"10.0.1.{name[-1]}", 0, 0, host_slots * EB)


def check(plan: PlacementPlan, nodes: list[NodeInfo], layers: int, experts: int) -> None:
    """Invariants of every plan: each expert once, memory limits held, derived fields right."""
    placed = [k for a in plan.actors for k in a.experts]
    assert sorted(placed) == [ExpertKey(la, e) for la in range(layers) for e in range(experts)]
    by_id = {n.node_id: n for n in nodes}
    ram = Counter()
    for a in plan.actors:
        node = by_id[a.node_id]
        assert a.name == f"expert-{a.index}" and a.address == node.address
        assert list(a.experts) == sorted(a.experts)
        assert a.device_slots * EB <= a.device_memory_bytes
        assert a.host_bytes == a.host_slots * EB <= a.host_memory_bytes
        assert a.device_slots == min(len(a.experts), a.device_memory_bytes // EB)
        fraction = a.device_slots / len(a.experts) if a.experts else 1.0
        assert a.expected_resident_fraction == pytest.approx(fraction)
        if a.device == "cuda":
            assert a.device_memory_bytes == node.gpu_memory_bytes
            ram[a.node_id] += a.host_memory_bytes
        else:
            assert node.num_gpus == 0 and a.host_memory_bytes == 0
            ram[a.node_id] += a.device_memory_bytes
    for node_id, used in ram.items():
        assert used <= by_id[node_id].host_memory_bytes


def test_one_actor_per_gpu_fills_devices_first():
    nodes = [gpu_node("n0", gpus=2), gpu_node("n1"), gpu_node("n2")]
    plan = plan_placement(nodes, grid(4, 8), EB)
    check(plan, nodes, 4, 8)
    assert [a.node_id for a in plan.actors] == ["n0", "n1", "n2", "n0"]  # distinct nodes first
    assert all(a.device == "cuda" and len(a.experts) == 8 for a in plan.actors)
    assert all(a.device_slots == 8 and a.host_bytes == 0 for a in plan.actors)
    assert all(a.expected_resident_fraction == 1.0 for a in plan.actors)
    assert sum(a.host_memory_bytes for a in plan.actors if a.node_id == "n0") == 10 * EB


def test_spill_to_host_behind_the_device_cache():
    nodes = [gpu_node("n0"), gpu_node("n1")]
    plan = plan_placement(nodes, grid(2, 16), EB)
    check(plan, nodes, 2, 16)
    for a in plan.actors:
        assert (len(a.experts), a.device_slots, a.host_bytes) == (16, 10, 6 * EB)
        assert a.expected_resident_fraction == pytest.approx(10 / 16)


def test_device_fill_is_proportional_to_device_memory():
    nodes = [gpu_node("n0", slots=30, host_slots=0), gpu_node("n1", slots=10, host_slots=0)]
    plan = plan_placement(nodes, grid(2, 8), EB)
    check(plan, nodes, 2, 8)
    assert [len(a.experts) for a in plan.actors] == [12, 4]


def test_each_layer_spreads_over_the_actors():
    nodes = [gpu_node(f"n{i}", slots=20) for i in range(4)]
    plan = plan_placement(nodes, grid(8, 8), EB)
    for layer in range(8):
        per_actor = Counter(plan.owner(ExpertKey(layer, e)).index for e in range(8))
        assert per_actor == {0: 2, 1: 2, 2: 2, 3: 2}


def test_deterministic_for_the_same_cluster_in_any_order():
    nodes = [gpu_node("n0", gpus=2, slots=7), gpu_node("n1", slots=13), cpu_node("n2", 9)]
    plan = plan_placement(nodes, grid(5, 8), EB)
    assert plan_placement(list(nodes), grid(5, 8), EB) == plan
    rng = random.Random(0)
    for _ in range(5):
        shuffled = rng.sample(nodes, len(nodes))
        assert plan_placement(shuffled, grid(5, 8), EB) == plan
    check(plan, nodes, 5, 8)


def test_nodes_without_gpus_get_one_cpu_actor_each():
    nodes = [cpu_node("n0", 30), cpu_node("n1", 30), gpu_node("n2", slots=30)]
    plan = plan_placement(nodes, grid(4, 8), EB)
    check(plan, nodes, 4, 8)
    devices = {a.node_id: a.device for a in plan.actors}
    assert devices == {"n0": "cpu", "n1": "cpu", "n2": "cuda"}
    cpu = plan.owner(ExpertKey(0, 0))
    assert (cpu.device_memory_bytes, cpu.host_memory_bytes, cpu.host_bytes) == (30 * EB, 0, 0)


def test_explicit_actor_count():
    nodes = [gpu_node("n0", gpus=2), gpu_node("n1", gpus=2), gpu_node("n2")]
    plan = plan_placement(nodes, grid(2, 8), EB, expert_actors=3)
    assert [a.node_id for a in plan.actors] == ["n0", "n1", "n2"]
    check(plan, nodes, 2, 8)
    two = plan_placement(nodes, grid(2, 8), EB, expert_actors=2)
    assert [a.node_id for a in two.actors] == ["n0", "n1"]
    assert two.actors[0].host_memory_bytes == 10 * EB  # n0's RAM is all its one actor's
    with pytest.raises(PlacementError, match="expert_actors=6 exceeds the 5 GPUs"):
        plan_placement(nodes, grid(2, 8), EB, expert_actors=6)
    with pytest.raises(PlacementError, match="expert_actors must be positive"):
        plan_placement(nodes, grid(2, 8), EB, expert_actors=0)


def test_explicit_count_shares_a_cpu_node_between_actors():
    nodes = [cpu_node("n0", 20), cpu_node("n1", 21)]
    plan = plan_placement(nodes, grid(2, 8), EB, expert_actors=5)
    check(plan, nodes, 2, 8)
    assert [a.node_id for a in plan.actors] == ["n0", "n1", "n0", "n1", "n0"]
    assert [a.device_memory_bytes for a in plan.actors] == [666, 1050, 666, 1050, 666]


def test_error_names_the_first_expert_without_room():
    nodes = [gpu_node("n0", slots=10, host_slots=5), gpu_node("n1", slots=10, host_slots=5)]
    with pytest.raises(PlacementError, match=r"cannot place layer 3 expert 6: it needs 100 bytes"):
        plan_placement(nodes, grid(4, 8), EB)  # 30 slots for 32 experts: the 31st is (3, 6)


def test_error_when_one_expert_is_larger_than_any_memory():
    nodes = [NodeInfo("n0", "10.0.0.0", 1, 250, 90)]
    with pytest.raises(PlacementError) as err:
        plan_placement(nodes, grid(2, 8), 300)
    msg = str(err.value)
    assert "layer 0 expert 0" in msg and "needs 300 bytes" in msg
    assert "most free on one actor is 340 bytes" in msg


@pytest.mark.parametrize(
    "nodes, args, match",
    [
        ([], (2, 8, EB), "no alive nodes"),
        ([gpu_node("n0"), gpu_node("n0")], (2, 8, EB), "node ids repeat"),
        ([NodeInfo("n0", "a", 1, -1, 0)], (2, 8, EB), "n0: gpu_memory_bytes is negative"),
        ([gpu_node("n0")], (2, 8, 0), "expert_bytes must be positive, got 0"),
    ],
)
def test_bad_inputs(nodes, args, match):
    layers, experts, expert_bytes = args
    with pytest.raises(PlacementError, match=match):
        plan_placement(nodes, grid(layers, experts), expert_bytes)


@pytest.mark.parametrize(
    "layers, experts, match",
    [
        ((), 8, "MoE layers must be distinct and ascending"),
        ((1, 0), 8, "MoE layers must be distinct and ascending"),
        ((0, 0), 8, "MoE layers must be distinct and ascending"),
        ((-1, 0), 8, "bad expert grid"),
        ((0, 1), 0, "bad expert grid"),
    ],
)
def test_a_plan_has_a_valid_grid_of_layers_and_experts(layers, experts, match):
    """What the planner checked of its layer and expert counts, the grid now checks itself."""
    with pytest.raises(ValueError, match=match):
        ExpertGrid(layers, experts)


def test_placement_covers_exactly_the_moe_layers_of_the_grid():
    """MoE layers need not start at 0 nor be contiguous: the plan holds exactly their keys."""
    nodes = [gpu_node("n0"), gpu_node("n1")]
    moe = ExpertGrid((1, 3, 4), 4)
    plan = plan_placement(nodes, moe, EB)
    placed = sorted(k for a in plan.actors for k in a.experts)
    assert placed == [ExpertKey(layer, e) for layer in (1, 3, 4) for e in range(4)]
    assert plan.grid == moe
    with pytest.raises(KeyError, match="layer 0 expert 0 is not in the plan"):
        plan.owner(ExpertKey(0, 0))
    assert plan.format().startswith("12 experts (3 MoE layers (layers [1, 3, 4]) x 4 experts)")


def test_replan_keeps_survivors_experts_and_respects_memory():
    nodes = [gpu_node("n0", slots=8, host_slots=8), gpu_node("n1", gpus=2, slots=8, host_slots=16)]
    nodes.append(gpu_node("n2", slots=8, host_slots=8))
    plan = plan_placement(nodes, grid(4, 8), EB)
    gone = {a.index for a in plan.actors if a.node_id == "n2"}
    after = replan(plan, [a.index for a in plan.actors if a.index not in gone])
    check(after, nodes, 4, 8)
    assert {a.index for a in after.actors} == {a.index for a in plan.actors} - gone
    for a in after.actors:
        before = next(b for b in plan.actors if b.index == a.index)
        assert set(before.experts) <= set(a.experts) and a.name == before.name
        assert len(a.experts) > len(before.experts)  # the orphans spread over every survivor
    assert sum(a.host_bytes for a in after.actors) == (32 - 24) * EB  # spilled to host RAM


def test_replan_with_every_actor_alive_changes_nothing():
    nodes = [gpu_node("n0"), gpu_node("n1")]
    plan = plan_placement(nodes, grid(2, 8), EB)
    assert replan(plan, [0, 1]) == plan


def test_replan_errors_name_the_expert_and_unknown_actors():
    nodes = [gpu_node("n0", slots=8, host_slots=0), gpu_node("n1", slots=8, host_slots=0)]
    plan = plan_placement(nodes, grid(2, 8), EB)
    with pytest.raises(PlacementError, match=r"cannot place layer 0 expert 1: it needs 100 bytes"):
        replan(plan, [0])
    with pytest.raises(
        PlacementError, match=r"actors \[7\] are not in the plan \(actors \[0, 1\]\)"
    ):
        replan(plan, [0, 7])


def test_owner_and_grouping_by_actor():
    plan = plan_placement([gpu_node("n0"), gpu_node("n1")], grid(2, 4), EB)
    keys = [ExpertKey(1, 3), ExpertKey(1, 0), ExpertKey(1, 1)]
    groups = plan.group_by_actor(keys)
    assert sorted(k for ks in groups.values() for k in ks) == sorted(keys)
    for index, ks in groups.items():
        assert all(plan.owner(k).index == index for k in ks) and ks == sorted(ks)
    with pytest.raises(KeyError, match="layer 2 expert 0 is not in the plan"):
        plan.owner(ExpertKey(2, 0))


def test_format_prints_one_row_per_actor():
    nodes = [gpu_node("n0"), cpu_node("n1")]
    text = plan_placement(nodes, grid(2, 14), EB).format()
    lines = text.splitlines()
    assert lines[0].startswith(
        "28 experts (2 MoE layers (layers 0-1) x 14 experts) of 100 B on 2 actors"
    )
    assert lines[1].split()[:5] == ["actor", "node", "address", "device", "experts"]
    assert lines[2].split()[:5] == ["expert-0", "n0", "10.0.0.0", "cuda", "18"]
    assert lines[3].split()[:5] == ["expert-1", "n1", "10.0.1.1", "cpu", "10"]
    assert lines[2].split()[-1] == f"{10 / 18:.2f}"


def test_mixtral_on_three_consumer_gpus():
    expert_bytes = 3 * 14336 * 4096 * 2  # bf16
    nodes = [NodeInfo(f"n{i}", f"10.0.0.{i}", 1, 22 * GiB, 32 * GiB) for i in range(3)]
    plan = plan_placement(nodes, grid(32, 8), expert_bytes)
    assert [len(a.experts) for a in plan.actors] == [86, 85, 85]
    assert all(a.device_slots == 67 for a in plan.actors)
    assert "expected resident fraction 0.79" in plan.format()


def ray_node(node_id: str, alive: bool = True, **resources: float) -> dict:
    base = {"CPU": 8.0, "memory": 64 * GiB, "object_store_memory": 8 * GiB}
    resources = {**base, f"node:10.0.0.{node_id[-1]}": 1.0, **resources}
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": f"10.0.0.{node_id[-1]}",
        "Resources": resources,
    }


def test_nodes_from_ray():
    raw = [
        ray_node("c2", GPU=2.0, accelerator_type_A10G=1.0),
        ray_node("a1", node_a=1.0),
        ray_node("b3", alive=False, GPU=8.0),
    ]
    raw[0]["Resources"]["accelerator_type:A10G"] = 1.0
    nodes = nodes_from_ray(raw, gpu_memory_bytes=20 * GiB, host_fraction=0.25)
    assert [n.node_id for n in nodes] == ["a1", "c2"]
    a1, c2 = nodes
    assert (a1.num_gpus, a1.gpu_memory_bytes, a1.host_memory_bytes) == (0, 0, 16 * GiB)
    assert (c2.num_gpus, c2.gpu_memory_bytes, c2.address) == (2, 20 * GiB, "10.0.0.2")
    assert a1.resources == {"node_a": 1.0}
    assert c2.resources == {"accelerator_type_A10G": 1.0}


def test_nodes_from_ray_bad_input():
    with pytest.raises(PlacementError, match=r"lacks \['NodeManagerAddress'\]"):
        nodes_from_ray([{"NodeID": "x", "Alive": True, "Resources": {}}])
    with pytest.raises(PlacementError, match="host_fraction must be in"):
        nodes_from_ray([ray_node("a1")], host_fraction=0)
