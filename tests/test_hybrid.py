"""Tiers 1-2: the hybrid CPU/device placement. The planner's choice for given cost figures and
its cost model against hand-worked cases and a simulated LRU cache; the CPU set computed while
the link moves a call's misses, never loaded; outputs of cpu-only, cache-only and hybrid
placements against the all-resident model (bit for bit: the same FFN on the same rows) and
transformers; the budget, the options and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import offload_rt
from offload_rt.analysis.traces import RoutingTrace, write_trace
from offload_rt.engine.hybrid import ACTIVATION_BYTES, GIB, RESERVE_TOKENS
from offload_rt.experts import ExpertStore, LocalExpertBackend, OffloadOptions, SlotCache
from offload_rt.experts.formats import expert_format, expert_nbytes
from offload_rt.experts.hybrid import (
    CostModel,
    HybridCosts,
    Routing,
    che_hit_rates,
    plan_hybrid,
)
from offload_rt.experts.quant import dequantize
from offload_rt.experts.transport import Transport
from offload_rt.grid import ExpertGrid, ExpertKey
from offload_rt.model import SwiGLU
from offload_rt.models import dense_nbytes, kv_bytes_per_token, open_checkpoint
from tests.test_cache import FORMAT, GRID, D, FakeSource, keys, reference
from tests.test_exactness import PROMPTS, reference_greedy
from tests.test_prefetch import NEW_TOKENS, SLOW_LINK, decode_logits, outputs, slow_link

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: not about threads

BENCH_GRID = ExpertGrid(tuple(range(8)), 8)  # bench_local's model: 8 layers x 8 experts, top-2
EXPERT = 34_600_000  # bytes of its float32 expert
PCIE = 16e9
QUARTER = 16  # slots: a quarter of its 64 experts


def gpu_costs(cpu_expert_s: float) -> HybridCosts:
    """A GPU behind 16 GB/s (2.16 ms an expert) computing an expert in 50 us."""
    return HybridCosts(EXPERT, cpu_expert_s, PCIE, 50e-6, device_is_host=False)


def plan(cpu_expert_s: float, **options):
    routing = Routing.even(BENCH_GRID, 2)
    return plan_hybrid(routing, gpu_costs(cpu_expert_s), QUARTER, **options)


# ---- the planner's choice


def test_a_fast_cpu_takes_every_expert_the_slots_do_not_hold():
    p = plan(0.5e-3, cpu_experts="auto")
    assert len(p.cpu) == 64 - QUARTER and p.slots == QUARTER == p.device_experts
    # spread evenly: 6 of 8 per layer, the highest indices
    assert all(experts == list(range(2, 8)) for experts in p.cpu_by_layer().values())
    assert p.predicted["this plan"] < p.predicted["cpu only"] < p.predicted["cache only"]


def test_a_slow_cpu_keeps_the_cache_only():
    p = plan(50e-3, cpu_experts="auto")
    assert not p.cpu and p.slots == QUARTER
    assert p.predicted["this plan"] == p.predicted["cache only"] < p.predicted["cpu only"]


def test_a_balanced_cpu_takes_an_interior_count_where_cpu_and_link_meet():
    """A CPU a little slower than the link per expert: every CPU expert takes link time off
    the misses and adds its own, so the best count lies between none and all."""
    p = plan(2e-3, cpu_experts="auto")
    n = len(p.cpu)
    assert 0 < n < 64 - QUARTER
    assert p.predicted["this plan"] < min(p.predicted["cpu only"], p.predicted["cache only"])
    model = CostModel(Routing.even(BENCH_GRID, 2), gpu_costs(2e-3), QUARTER)
    order = Routing.even(BENCH_GRID, 2).order()
    assert frozenset(order[:n]) == p.cpu
    here = model.seconds(p.cpu)
    assert (
        model.seconds(frozenset(order[: n - 1])) > here < model.seconds(frozenset(order[: n + 1]))
    )
    # why: the CPU's expected share of a layer (experts x 2 ms) has caught up with the link's
    # (misses x 2.16 ms); fewer CPU experts leave the link the longer, more the CPU
    print(p.format())


def test_cpu_moe_layers_puts_whole_first_layers_on_the_cpu():
    p = plan(2e-3, cpu_moe_layers=3)
    assert p.cpu == {ExpertKey(layer, e) for layer in (0, 1, 2) for e in range(8)}
    assert p.how == "first 3 MoE layers" and p.slots == QUARTER
    q = plan(2e-3, cpu_moe_layers=8)
    assert len(q.cpu) == 64 and q.slots == 0
    assert q.predicted["this plan"] == q.predicted["cpu only"]


def test_a_count_per_layer_takes_the_least_used_experts_of_a_trace():
    grid = ExpertGrid((1, 3), 4)  # MoE layers need not start at 0
    counts = {ExpertKey(1, e): c for e, c in enumerate([9, 1, 5, 3])}
    counts.update({ExpertKey(3, e): c for e, c in enumerate([2, 8, 8, 0])})
    routing = Routing.from_counts(grid, 2, counts)
    assert sum(routing.rates[ExpertKey(1, e)] for e in range(4)) == pytest.approx(2.0)
    p = plan_hybrid(routing, gpu_costs(2e-3), 2, cpu_experts=2)
    assert p.cpu == {ExpertKey(1, 1), ExpertKey(1, 3), ExpertKey(3, 3), ExpertKey(3, 0)}
    assert not p.uniform and "frequencies" in p.format()


def test_the_cost_model_on_hand_worked_layers():
    """One layer of 4 experts, top-1 (no binomial mixing), on a GPU: each term by hand."""
    grid = ExpertGrid((0,), 4)
    c = HybridCosts(1000, cpu_expert_s=3.0, link_bytes_per_s=500.0, device_expert_s=1.0,
                    device_is_host=False)  # fmt: skip
    link = 2.0  # 1000 bytes at 500 B/s
    even = Routing.even(grid, 1)
    # cache only, 1 slot of 4: a hit 1 time in 4 (uniform: slots / experts)
    assert CostModel(even, c, 1).seconds(frozenset()) == pytest.approx(
        0.25 * 1.0 + 0.75 * (link + 1.0)
    )
    # expert 3 on the CPU, 3 slots for the other 3: all resident
    assert CostModel(even, c, 3).seconds(frozenset(keys(3))) == pytest.approx(
        0.25 * 3.0 + 0.75 * 1.0
    )
    # compute on a miss: the CPU (3 s) loses to the link (2 s, then 1 s on the device)
    assert CostModel(even, c, 1, compute_on_miss=True).seconds(frozenset()) == pytest.approx(
        0.25 * 1.0 + 0.75 * (link + 1.0)
    )
    fast = HybridCosts(1000, 1.5, 500.0, 1.0, device_is_host=False)
    assert CostModel(even, fast, 1, compute_on_miss=True).seconds(frozenset()) == pytest.approx(
        0.25 * 1.0 + 0.75 * 1.5
    )
    # a CPU device: residents take the CPU's cores, so CPU and resident experts add up
    host = HybridCosts(1000, 1.0, 500.0, 1.0, device_is_host=True)
    two = Routing.even(grid, 2)  # top-2 of 4, one CPU expert: 1 or 0 of the 2 on the CPU
    got = CostModel(two, host, 3).seconds(frozenset(keys(3)))
    assert got == pytest.approx(2 * 1.0)  # every expert computed once, by the same cores


def test_che_hit_rates_match_a_simulated_lru_cache():
    rng = np.random.default_rng(0)
    rates = rng.pareto(1.5, 16) + 0.05
    probs = rates / rates.sum()
    for slots in (2, 4, 8):
        lru: list[int] = []
        hits = np.zeros(16)
        asks = np.zeros(16)
        for i in rng.choice(16, size=40_000, p=probs):
            asks[i] += 1
            if i in lru:
                hits[i] += 1
                lru.remove(i)
            elif len(lru) == slots:
                lru.pop(0)
            lru.append(i)
        simulated = hits.sum() / asks.sum()
        predicted = float((probs * che_hit_rates(rates, slots)).sum())
        assert predicted == pytest.approx(simulated, abs=0.02), slots
    assert np.allclose(che_hit_rates(np.full(10, 0.3), 4), 0.4)  # uniform: slots / items
    assert (che_hit_rates(rates, 16) == 1).all() and (che_hit_rates(rates, 0) == 0).all()


def test_planner_errors_name_the_option():
    with pytest.raises(ValueError, match="cpu_experts.*or cpu_moe_layers.*not both"):
        plan(2e-3, cpu_experts=2, cpu_moe_layers=1)
    with pytest.raises(ValueError, match=r"cpu_experts \(--cpu-experts\).*0 to the 8"):
        plan(2e-3, cpu_experts=9)
    with pytest.raises(ValueError, match="cpu_experts"):
        plan(2e-3, cpu_experts=True)
    with pytest.raises(ValueError, match=r"cpu_moe_layers \(--cpu-moe\).*0 to the 8 MoE"):
        plan(2e-3, cpu_moe_layers=-1)
    with pytest.raises(ValueError, match="no expert slot.*leaves 32 on the device"):
        plan_hybrid(Routing.even(BENCH_GRID, 2), gpu_costs(2e-3), 0, cpu_moe_layers=4)
    assert len(plan_hybrid(Routing.even(BENCH_GRID, 2), gpu_costs(1.0), 0, "auto").cpu) == 64
    with pytest.raises(ValueError, match="cpu_expert_s must be positive"):
        HybridCosts(EXPERT, -1.0, PCIE, 0.0, False)


# ---- the backend's CPU set


def test_the_cpu_set_computes_while_the_link_moves_the_misses(monkeypatch):
    """Expert 1 of layer 0 is in the CPU set; expert 0 misses behind a link of 0.2 s an
    expert. The CPU set's compute runs while that load is in flight, and its expert is read
    from disk once, held, and never moves over the link."""
    source = FakeSource()
    store = ExpertStore(source, FORMAT, torch.device("cpu"), 2, None)
    options = OffloadOptions(cpu_experts=frozenset(keys(1)))
    backend = LocalExpertBackend(store, SlotCache(2), GRID, options, slow_link())
    missing, on_cpu = keys(0, 1)
    in_flight: list[bool] = []
    hold = backend.store.hold

    def traced_hold(key):
        ffn = hold(key)

        def compute(x):
            loads = backend.loads
            in_flight.append(missing in loads and not loads.future(missing).done())
            return ffn(x)

        return compute

    monkeypatch.setattr(backend.store, "hold", traced_hold)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        out = backend.run({missing: x, on_cpu: x})
        for k in (missing, on_cpu):
            torch.testing.assert_close(out[k], reference(source, k, x))
    assert in_flight == [True, False]  # the first call's miss was still on the link
    s = backend.stats()
    assert source.reads == [on_cpu, missing]  # the CPU set's expert read once, then held
    assert (s["misses"], s["hits"], s["cpu_computed"], s["cpu_resident"]) == (1, 1, 2, 1)
    assert s["bytes_loaded"] == store.nbytes and on_cpu not in backend.cache
    backend.close()


def test_a_cpu_set_needs_a_link_and_keys_of_the_model():
    store = ExpertStore(FakeSource(), FORMAT, torch.device("cpu"), 2, None)
    with pytest.raises(ValueError, match="CPU set.*behind a link"):
        LocalExpertBackend(
            store, SlotCache(2), GRID, OffloadOptions(cpu_experts=frozenset(keys(1)))
        )
    stray = OffloadOptions(cpu_experts=frozenset([ExpertKey(5, 0)]))
    with pytest.raises(ValueError, match="not in the model"):
        LocalExpertBackend(store, SlotCache(2), GRID, stray, slow_link())


# ---- whole models: budget, exactness, counters


def budget_gb(folder, slots: int) -> float:
    """A device budget holding the dense weights, the reserve and `slots` float32 experts
    (and half an expert more, which is not a slot)."""
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    reserve = RESERVE_TOKENS * kv_bytes_per_token(cfg, torch.float32) + ACTIVATION_BYTES
    expert = expert_nbytes(cfg, torch.float32)
    dense = dense_nbytes(ckpt, torch.float32)
    ckpt.close()
    return (dense + reserve + (slots + 0.5) * expert) / GIB


def test_dense_bytes_are_the_checkpoints_tensors_but_the_experts(reference):
    folder, _ = reference
    tensors = load_file(folder / "model.safetensors")
    dense = sum(t.numel() * 4 for name, t in tensors.items() if ".experts." not in name)
    ckpt = open_checkpoint(folder)
    assert dense_nbytes(ckpt, torch.float32) == dense
    assert dense_nbytes(ckpt, torch.bfloat16) == dense // 2
    # Mixtral's cache: keys and values of 2 KV heads of 16 in each of 2 layers
    assert kv_bytes_per_token(ckpt.config, torch.float32) == 2 * 2 * 2 * 16 * 4
    ckpt.close()


def test_the_budget_sets_the_slots(reference):
    folder, _ = reference
    with offload_rt.load(folder, link_gbps=SLOW_LINK, gpu_memory_gb=budget_gb(folder, 5)) as m:
        assert m.placement.budget.slots == 5 and m.backend.cache.capacity == 5
        assert m.placement.plan is None and m.backend.prefetcher is not None  # capped
        assert "5 expert slots" in m.placement.budget.describe()


@pytest.fixture(scope="module")
def resident(reference):
    """Prefill logits, decode logits, greedy tokens and counters with every expert resident."""
    return outputs(reference[0])


PLACEMENTS = {
    "cpu only": dict(cpu_experts=8),
    "cache only": dict(),
    "hybrid auto": dict(cpu_experts="auto"),
    "hybrid 3 per layer": dict(cpu_experts=3),
    "cpu_moe_layers 1": dict(cpu_moe_layers=1),
    "hybrid 3 per layer + compute on miss": dict(cpu_experts=3, compute_on_miss=True),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placements_change_no_output(reference, resident, monkeypatch, name):
    folder, hf = reference
    loaded: list[ExpertKey] = []
    submit = Transport.submit

    def traced_submit(self, key, slot, urgent):
        loaded.append(key)
        return submit(self, key, slot, urgent)

    monkeypatch.setattr(Transport, "submit", traced_submit)
    options = dict(link_gbps=SLOW_LINK, gpu_memory_gb=budget_gb(folder, 5), **PLACEMENTS[name])
    with offload_rt.load(folder, **options) as m:
        plan = m.placement.plan
        got = (
            m.logits(PROMPTS[0]),
            decode_logits(m, PROMPTS[2], NEW_TOKENS),
            [r.token_ids for r in m.generate(PROMPTS, max_new_tokens=NEW_TOKENS)],
        )
        stats = m.stats()
    assert torch.equal(got[0], resident[0]) and torch.equal(got[1], resident[1])
    assert got[2] == resident[2] == [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert (got[0] - ref).abs().max().item() <= 1e-4
    cpu = plan.cpu if plan is not None else frozenset()
    assert not cpu & set(loaded)  # the CPU set never crosses the link
    moved, rest = divmod(stats["bytes_loaded"], expert_nbytes(m.config, torch.float32))
    assert rest == 0 and moved <= len(loaded)  # loads less those cancelled before a byte
    if "compute on miss" not in name:  # (there a miss may run on the CPU instead)
        assert moved == stats["misses"] + stats.get("prefetch_loads", 0)
    assert stats["resident_max"] <= 5
    if cpu:
        assert stats["cpu_experts"] == len(cpu) and stats["cpu_computed"] > 0
        assert stats["cpu_resident"] <= len(cpu)
    if name == "cpu only":
        assert stats["hits"] == stats["misses"] == len(loaded) == 0
    else:
        assert stats["misses"] > 0 and loaded
    if "compute on miss" in name:
        assert stats["host_computed"] > 0


def test_auto_on_a_cpu_device_fills_the_slots_and_computes_the_rest_on_the_cpu(reference):
    """Here the "device" is this CPU: a resident expert costs what a CPU one does, and a miss
    only adds link time, so the planner leaves on the device side just what the slots hold."""
    folder, _ = reference
    with offload_rt.load(
        folder, link_gbps=SLOW_LINK, gpu_memory_gb=budget_gb(folder, 5), cpu_experts="auto"
    ) as m:
        p = m.placement.plan
        assert p.costs.device_is_host and p.device_experts == p.slots == 5
        assert p.predicted["this plan"] <= p.predicted["cache only"]
        assert m.backend.prefetcher is None  # nothing left to guess: the slots hold it all
        text = m.placement.budget.describe() + "\n" + p.format()
        assert "11 of 16 experts on the CPU" in text and "cache only" in text


def test_the_planner_reads_a_routing_trace(reference, tmp_path):
    folder, _ = reference
    with offload_rt.load(folder, record_routing=True) as m:
        m.generate(PROMPTS, max_new_tokens=16)
        trace = m.routing_trace()
    write_trace(tmp_path / "t.msgpack", trace)
    counts = {key: 0 for key in m.config.grid.keys()}
    for i, one in enumerate(trace.passes):
        if not trace.is_prompt(i):
            for layer in m.config.grid.layers:
                for e in one[layer]:
                    counts[ExpertKey(layer, e)] += 1
    options = dict(link_gbps=SLOW_LINK, cache_experts=6, cpu_experts=2)
    with offload_rt.load(folder, routing_trace=tmp_path / "t.msgpack", **options) as m:
        cpu = m.placement.plan.cpu
    for layer in m.config.grid.layers:
        chosen = sorted(counts[k] for k in cpu if k.layer == layer)
        assert chosen == sorted(counts[k] for k in m.config.grid.layer_keys(layer))[:2]


def test_hybrid_options_are_checked(reference, tmp_path):
    folder, _ = reference
    with pytest.raises(ValueError, match="gpu_memory_gb must be positive"):
        offload_rt.load(folder, gpu_memory_gb=-1.0)
    with pytest.raises(ValueError, match="does not hold .*dense weights.*give at least"):
        offload_rt.load(folder, gpu_memory_gb=0.01)
    with pytest.raises(ValueError, match="no expert slot"):
        offload_rt.load(folder, gpu_memory_gb=budget_gb(folder, 0), link_gbps=SLOW_LINK)
    with pytest.raises(ValueError, match="cache_experts .* or gpu_memory_gb .* not both"):
        offload_rt.load(folder, cache_experts=4, gpu_memory_gb=budget_gb(folder, 5))
    with pytest.raises(ValueError, match="on a CPU device give link_gbps"):
        offload_rt.load(folder, cache_experts=4, cpu_experts="auto")
    with pytest.raises(ValueError, match="not both"):
        offload_rt.load(folder, link_gbps=SLOW_LINK, cpu_experts=1, cpu_moe_layers=1)
    with pytest.raises(ValueError, match="routing_trace .* needs cpu_experts"):
        offload_rt.load(folder, routing_trace=tmp_path / "none.msgpack")
    with pytest.raises(ValueError, match="cpu_experts, cpu_moe_layers: .*local backend"):
        offload_rt.load(folder, backend="ray", cpu_experts="auto", cpu_moe_layers=1)
    write_trace(tmp_path / "t.msgpack", RoutingTrace(2, 4, (((0,), (1,)),)))  # 4 experts
    with pytest.raises(ValueError, match="does not fit this model"):
        offload_rt.load(
            folder, link_gbps=SLOW_LINK, cpu_experts=1, routing_trace=tmp_path / "t.msgpack"
        )
    # a budget of no slot is fine when every expert is on the CPU
    with offload_rt.load(
        folder, gpu_memory_gb=budget_gb(folder, 0), link_gbps=SLOW_LINK, cpu_experts="auto"
    ) as m:
        assert len(m.placement.plan.cpu) == 16


# ---- quantized experts on the CPU


def test_a_quantized_expert_on_the_cpu_equals_its_dequantized_weights(reference, tmp_path):
    """The host FFN reads the codes through the CPU kernels; the reference is float64 math
    on the dequantized weights. On CUDA the device path (dequantized into scratch) agrees."""
    from offload_rt.tools.quantize import quantize_checkpoint

    folder = tmp_path / "q4"
    quantize_checkpoint(reference[0], folder, 4, 32, progress=False)
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    fmt = expert_format(cfg, torch.device("cpu"), torch.float32)
    buf = torch.empty(fmt.numel, dtype=torch.uint8)
    parts = ckpt.expert(1, 5)
    fmt.pack(parts, buf)
    w = {
        p: dequantize(_quantized(parts, p), cfg.quantization).double()
        for p in ("gate", "up", "down")
    }
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    want = SwiGLU(torch.cat([w["gate"], w["up"]]), w["down"])(x.double())
    for rows in (1, 3):
        got = fmt.host_ffn(buf)(x[:rows])
        torch.testing.assert_close(got.double(), want[:rows], rtol=2e-5, atol=2e-5)
    if torch.cuda.is_available():
        dev = expert_format(cfg, torch.device("cuda"), torch.float32)
        slot = buf.to("cuda")
        on_gpu = dev.weights(dev.views(slot))(x.cuda())
        torch.testing.assert_close(dev.host_ffn(buf)(x).cuda(), on_gpu, rtol=1e-4, atol=1e-4)
    ckpt.close()
    # and a whole quantized model with a CPU set gives the all-resident one's outputs
    base = outputs(folder)
    got = outputs(folder, link_gbps=SLOW_LINK, cache_experts=4, cpu_experts=5)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]) and got[2] == base[2]
    assert got[3]["cpu_computed"] > 0


def _quantized(parts, name):
    from offload_rt.experts.quant import QuantizedTensor

    return QuantizedTensor(
        parts[f"{name}.qweight"], parts[f"{name}.scales"], parts[f"{name}.offsets"]
    )


# ---- the command line


def test_plan_and_generate_print_the_hybrid_placement(reference):
    from tests.test_cli import offload_rt as cli

    folder = str(reference[0])
    out = cli("plan", folder, "--cpu-experts", "auto", "--link-gbps", "0.1", "--cache-experts", "4")
    assert out.returncode == 0, out.stderr
    assert "hybrid placement (auto): 12 of 16 experts on the CPU" in out.stdout
    assert "cpu only" in out.stdout and "cache only" in out.stdout
    args = ["generate", folder, "--token-ids", "1,5,9", "--max-new-tokens", "6"]
    gen = cli(*args, "--cpu-moe", "1", "--link-gbps", "0.1", "--cache-experts", "4")
    assert gen.returncode == 0, gen.stderr
    assert "first 1 MoE layers" in gen.stdout and "cpu_computed=" in gen.stdout
    bad = cli(*args, "--cpu-moe", "1")
    assert bad.returncode == 2 and "give link_gbps" in bad.stderr


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_other_families_take_a_cpu_set_and_their_own_kv_reserve(tmp_path, family):
    """A dense first layer (MoE layers from 1), latent attention, clamped experts with biases,
    sliding windows: the CPU set changes no output, and the reserve counts each family's own
    KV cache per token (the model's own cache, measured)."""
    from tests.families import save_family

    save_family(family, tmp_path / "m")
    with offload_rt.load(tmp_path / "m") as m:
        base = decode_logits(m, PROMPTS[0], 8)
        n = m.config.max_position_embeddings  # past any sliding window: a ring holds fewer
        cache = m.model.new_cache(1, n)
        per_token = sum(t.numel() for t in (*cache.keys, *cache.values)) * 4 // n
        assert kv_bytes_per_token(m.config, torch.float32) >= per_token
        full = [w for w in cache.windows if w is None]
        if len(full) == len(cache.windows):  # no ring layer: exactly the cache's bytes
            assert kv_bytes_per_token(m.config, torch.float32) == per_token
    options = dict(link_gbps=SLOW_LINK, cache_experts=3, cpu_experts="auto")
    with offload_rt.load(tmp_path / "m", **options) as m:
        assert torch.equal(decode_logits(m, PROMPTS[0], 8), base)
        plan = m.placement.plan
        assert {k.layer for k in plan.cpu} <= set(m.config.grid.layers) and plan.cpu
        assert m.stats()["cpu_computed"] > 0
