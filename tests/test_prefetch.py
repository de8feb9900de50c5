"""Tiers 1-2: speculative prefetch, asynchronous loads and compute on a miss change no output;
their counters on scripted cases.

Exactness here is bit for bit: with and without these options every expert runs the same
`SwiGLU` on the same rows of the same float32 weights on the same CPU, and the MoE block
sums outputs in a fixed order, so logits must be `torch.equal`, not merely close.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.engine import BatchDecoder
from offload_rt.experts import ExpertStore, LocalExpertBackend, OffloadOptions, SlotCache
from offload_rt.experts.transport import SimulatedLink
from offload_rt.model import SwiGLU
from tests.conftest import save_reference
from tests.test_cache import FORMAT, GRID, D, F, FakeSource, keys, reference
from tests.test_exactness import PROMPTS, reference_greedy

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: not about threads

NEW_TOKENS = 32
SLOW_LINK = 0.1  # GB/s: a tiny test expert (72 KiB) then takes 0.7 ms, so loads overlap compute


def decode_logits(model: offload_rt.OffloadModel, prompt: list[int], n: int) -> torch.Tensor:
    """Greedy decode of n tokens one step at a time; the logits of every step (n, V)."""
    decoder = BatchDecoder(model.model, [prompt], len(prompt) + n)
    steps = [decoder.prefill()]
    for _ in range(n - 1):
        steps.append(decoder.step([int(steps[-1][0].argmax())], [True]))
    return torch.cat(steps)


def outputs(folder: Path, **options) -> tuple[torch.Tensor, torch.Tensor, list, dict]:
    """Prefill logits, decode logits, batch greedy tokens and the counters of one load."""
    with offload_rt.load(folder, **options) as model:
        prefill = model.logits(PROMPTS[0])
        decode = decode_logits(model, PROMPTS[2], NEW_TOKENS)
        tokens = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
        return prefill, decode, tokens, model.stats()


# every cache size with and without a link; each guess point twice, not with every pair (a
# load decodes 32 tokens four ways: the full product took 48 s a case on a loaded machine)
@pytest.mark.parametrize(
    "cache_experts, link_gbps, predict_from",
    [
        (2, None, "attention"),
        (5, None, "moe"),
        (11, None, "both"),
        (2, SLOW_LINK, "both"),
        (5, SLOW_LINK, "attention"),
        (11, SLOW_LINK, "moe"),
    ],
)
def test_prefetch_changes_no_output(reference, cache_experts, link_gbps, predict_from):
    folder, hf = reference
    base = outputs(folder, cache_experts=cache_experts, link_gbps=link_gbps, prefetch=False)
    assert base[2] == [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    got = outputs(
        folder,
        cache_experts=cache_experts,
        link_gbps=link_gbps,
        prefetch=True,
        prefetch_from=predict_from,
    )
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert got[2] == base[2]
    stats = got[3]
    assert stats["resident_max"] <= cache_experts and 0.0 < stats["prefetch_recall"] <= 1.0
    # with 2 slots the running layer holds both whenever a guess is made after its attention
    assert stats["prefetch_loads"] > 0 or (cache_experts == 2 and predict_from == "moe")


@pytest.mark.parametrize(  # each cache size once, prefetch on and off: not their product
    "cache_experts, prefetch", [(2, True), (5, False), (11, True)]
)
def test_compute_on_miss_changes_no_output(reference, cache_experts, prefetch):
    folder, _ = reference
    opts = dict(cache_experts=cache_experts, link_gbps=SLOW_LINK, prefetch=prefetch)
    base = outputs(folder, **opts)
    got = outputs(folder, **opts, compute_on_miss=True)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert got[2] == base[2]
    # on a CPU device the CPU and the "device" compute alike: every miss held in host RAM
    # runs there, so fewer bytes cross the link
    assert got[3]["host_computed"] > 0
    assert got[3]["bytes_loaded"] < base[3]["bytes_loaded"]


def test_loads_run_while_resident_experts_compute(monkeypatch):
    """The resident expert's compute blocks until the missing expert's load has begun on the
    loader thread (it reads the expert into the host tier), and the prefetch of the next
    layer likewise: a loader that ran loads only between computes would never set the
    events, and the call would fail on the timeout."""
    source = FakeSource()
    backend = prefetching_backend(source, capacity=4, link=slow_link())
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1))
    backend.run({k: x for k in keys(0)})
    started = {k: threading.Event() for k in [*keys(1), *keys(2, layer=1)]}
    read, compute = backend.store.host_buffer, backend.runner.resident

    def traced_read(key):
        started[key].set()
        return read(key)

    def blocking_compute(key, inp):
        if key == keys(0)[0]:
            for event in started.values():
                assert event.wait(timeout=10), "a load did not start while layer 0 computed"
        return compute(key, inp)

    monkeypatch.setattr(backend.store, "host_buffer", traced_read)
    monkeypatch.setattr(backend.runner, "resident", blocking_compute)
    backend.prefetcher.fetch(1, [2])
    out = backend.run({k: x for k in keys(0, 1)})
    for k in keys(0, 1):
        torch.testing.assert_close(out[k], reference(source, k, x))
    backend.close()


def router_name(layer: int) -> str:
    """Mixtral's router tensor as the hub (and transformers' save_pretrained) names it."""
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def predictable_checkpoint(folder: Path) -> Path:
    """A 4-layer model whose layers all share layer 0's router and change the residual stream
    by a thousandth: the hidden state after layer L's attention routes as layer L+1's will."""
    save_reference(folder, seed=3, num_hidden_layers=4)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if name.endswith(("o_proj.weight", "w2.weight")):
            tensors[name] = tensors[name] * 1e-3
    for layer in range(1, 4):
        tensors[router_name(layer)] = tensors[router_name(0)].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def test_prefetch_stats_on_a_predictable_model(tmp_path, reference):
    folder = predictable_checkpoint(tmp_path / "predictable")
    opts = dict(cache_experts=6, prefetch=True, prefetch_from="moe")
    with offload_rt.load(folder, **opts) as model:
        model.generate(PROMPTS[0], max_new_tokens=16)
        sure = model.stats()
    assert sure["prefetch_recall"] >= 0.97
    assert sure["prefetch_precision"] >= 0.97 and sure["prefetch_used"] > 0
    assert 0.0 <= sure["prefetch_on_time"] <= 1.0
    # the control: the random model's layers route independently, so the guess is worse
    with offload_rt.load(reference[0], **opts) as model:
        model.generate(PROMPTS[0], max_new_tokens=16)
        control = model.stats()
    assert control["prefetch_recall"] < 0.9


def prefetching_backend(source: FakeSource, capacity: int, link: SimulatedLink | None = None):
    store = ExpertStore(source, FORMAT, torch.device("cpu"), capacity, None)
    options = OffloadOptions(prefetch=True)
    return LocalExpertBackend(store, SlotCache(capacity), GRID, options, link)


def test_prefetch_counters_on_a_scripted_sequence():
    source = FakeSource()
    backend = prefetching_backend(source, capacity=4)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2))
    backend.prefetcher.fetch(1, [2, 5])
    backend.settle()
    out = backend.run({k: x for k in keys(2, 5, layer=1)})
    for k in keys(2, 5, layer=1):
        torch.testing.assert_close(out[k], reference(source, k, x))
    s = backend.stats()
    assert (s["hits"], s["misses"], s["prefetch_loads"], s["prefetch_used"]) == (2, 0, 2, 2)
    assert (s["prefetch_recall"], s["prefetch_precision"], s["prefetch_on_time"]) == (1, 1, 1)
    # a half-right guess: 3 is used, 4 is loaded for nothing and goes first when room is needed
    backend.prefetcher.fetch(1, [3, 4])
    backend.settle()
    backend.run({k: x for k in keys(3, 6, layer=1)})
    s = backend.stats()
    assert (s["prefetch_used"], s["prefetch_wasted"], s["misses"]) == (3, 1, 1)
    assert s["prefetch_recall"] == pytest.approx(3 / 4)
    assert s["prefetch_precision"] == pytest.approx(3 / 4)
    # 6's load took the slot of 4, demoted when layer 1 ran without it, not an older expert's
    assert set(backend.cache.resident_keys()) == set(keys(2, 5, 3, 6, layer=1))
    assert s["evictions"] == 1
    backend.close()


def test_prefetch_never_evicts_the_running_layer_or_a_predicted_expert():
    backend = prefetching_backend(FakeSource(), capacity=3)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    backend.run({k: x for k in keys(0, 1, layer=0)})
    backend.prefetcher.fetch(1, [4, 5])  # one free slot: 4 takes it; 5 finds only layer 0's experts
    backend.settle()
    assert set(backend.cache.resident_keys()) == {*keys(0, 1), *keys(4, layer=1)}
    assert backend.stats()["prefetch_loads"] == 1
    backend.close()


def slow_link() -> SimulatedLink:
    return SimulatedLink(bytes_per_s=3 * D * F * 4 / 0.2)  # 0.2 s per test expert


def test_late_and_cancelled_prefetches():
    source = FakeSource()
    backend = prefetching_backend(source, capacity=8, link=slow_link())
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(4))
    backend.prefetcher.fetch(1, [2, 5, 7])  # 2 starts at once; 5 and 7 queue
    backend.prefetcher.fetch(1, [2, 7])  # a newer guess drops 5 before it starts
    backend.run({k: x for k in keys(2, 6, layer=1)})  # 2 still on its way: late; 7 unused
    s = backend.stats()
    assert source.reads == keys(2, 6, layer=1)
    assert (s["prefetch_cancelled"], s["prefetch_used"], s["prefetch_on_time"]) == (2, 1, 0)
    assert (s["prefetch_loads"], s["prefetch_wasted"]) == (1, 0)
    assert s["bytes_loaded"] == 2 * 3 * D * F * 4  # the two cancelled loads moved nothing
    assert keys(5, layer=1)[0] not in backend.cache and keys(7, layer=1)[0] not in backend.cache
    backend.close()


def test_demand_loads_go_before_queued_prefetches():
    source = FakeSource()
    backend = prefetching_backend(source, capacity=8, link=slow_link())
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(5))
    backend.prefetcher.fetch(1, [2, 5])  # 2 starts (unless the worker is slow to wake); 5 queues
    backend.run({k: x for k in keys(3, layer=0)})  # layer 0 needs 3: it goes before 5
    backend.settle()
    reads = source.reads
    assert sorted(reads) == [*keys(3), *keys(2, 5, layer=1)]
    assert reads.index(keys(3)[0]) < reads.index(keys(5, layer=1)[0])
    backend.close()


def test_a_failed_prefetch_leaves_the_expert_to_a_demand_load():
    source = FakeSource(fail={keys(4, layer=1)[0]})
    backend = prefetching_backend(source, capacity=4)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(6))
    backend.prefetcher.fetch(1, [4])
    backend.settle()
    assert keys(4, layer=1)[0] not in backend.cache
    source.fail.clear()
    out = backend.run({k: x for k in keys(4, layer=1)})
    torch.testing.assert_close(out[keys(4, layer=1)[0]], reference(source, keys(4, layer=1)[0], x))
    backend.close()


def test_offload_options_are_checked(reference):
    folder, _ = reference
    with pytest.raises(ValueError, match="prefetch_from"):
        offload_rt.load(folder, prefetch_from="router")
    with pytest.raises(ValueError, match="compute_on_miss.*link_gbps"):
        offload_rt.load(folder, cache_experts=4, compute_on_miss=True)
    with pytest.raises(ValueError, match="prefetch.*local backend"):
        offload_rt.load(folder, backend="ray", prefetch=True)


def test_prefetch_is_on_by_default_only_for_a_capped_cache_behind_a_link(reference):
    folder, _ = reference
    for options in ({}, {"cache_experts": 4}, {"link_gbps": SLOW_LINK}):
        with offload_rt.load(folder, **options) as model:
            assert model.model.prefetcher is None and "prefetch_recall" not in model.stats()
    with offload_rt.load(folder, cache_experts=4, link_gbps=SLOW_LINK) as model:
        assert model.model.prefetcher is not None
        assert model.model.prefetcher is model.backend.prefetcher
        assert "prefetch_recall" in model.stats()
    with offload_rt.load(folder, cache_experts=4, prefetch=True) as model:
        assert model.model.prefetcher is not None
        assert model.model.prefetcher is model.backend.prefetcher


def test_cli_prints_the_prefetch_counters_and_takes_the_options(reference):
    from tests.test_cli import offload_rt as cli

    args = ["generate", str(reference[0]), "--token-ids", "1,5,9", "--max-new-tokens", "6"]
    on = cli(*args, "--cache-experts", "3", "--prefetch", "--prefetch-from", "moe")
    assert on.returncode == 0, on.stderr
    assert "prefetch_recall=" in on.stdout and "prefetch_on_time=" in on.stdout
    off = cli(
        *args, "--cache-experts", "3", "--no-prefetch", "--compute-on-miss", "--link-gbps", "1"
    )
    assert off.returncode == 0, off.stderr
    assert "prefetch_recall=" not in off.stdout and "host_computed=" in off.stdout
    # the generated tokens (the first line) are the same either way
    assert on.stdout.splitlines()[0] == off.stdout.splitlines()[0]


def test_offload_options_of_load_change_no_tokens(reference):
    folder, _ = reference
    opts = dict(cache_experts=5, link_gbps=SLOW_LINK)
    with offload_rt.load(folder, **opts, prefetch=False) as model:
        plain = model.generate(PROMPTS, max_new_tokens=12)
        assert "prefetch_recall" not in model.stats() and "host_computed" not in model.stats()
    more = dict(prefetch=True, prefetch_from="moe", compute_on_miss=True)
    with offload_rt.load(folder, **opts, **more) as model:
        assert model.model.prefetcher is model.backend.prefetcher
        assert model.backend.prefetcher is not None
        assert model.backend.prefetcher.predict_from == "moe"
        switched = model.generate(PROMPTS, max_new_tokens=12)
        stats = model.stats()
        assert stats["prefetch_loads"] > 0 and stats["host_computed"] > 0
    assert [r.token_ids for r in switched] == [r.token_ids for r in plain]


@pytest.mark.parametrize("bits", [8, 4])
def test_prefetch_with_quantized_experts_changes_no_output(reference, tmp_path, bits):
    """Quantized slots hold the codec's bytes (bound to the host buffer behind a simulated
    link); prefetch moves them as it moves float ones. A miss computed on the CPU runs the
    host buffer's codes through the same kernels, so compute_on_miss changes nothing either."""
    from offload_rt.tools.quantize import quantize_checkpoint

    folder = tmp_path / f"q{bits}"
    quantize_checkpoint(reference[0], folder, bits, 32, progress=False)
    opts = dict(cache_experts=5, link_gbps=SLOW_LINK)
    base = outputs(folder, **opts, prefetch=False)
    got = outputs(folder, **opts, prefetch=True)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert got[2] == base[2] and got[3]["prefetch_loads"] > 0
    on_cpu = outputs(folder, **opts, prefetch=False, compute_on_miss=True)
    assert torch.equal(on_cpu[0], base[0]) and torch.equal(on_cpu[1], base[1])
    assert on_cpu[2] == base[2] and on_cpu[3]["host_computed"] > 0


def test_an_arriving_expert_starts_on_w13_before_its_w2_lands():
    """Behind a slow link, a missing expert's w13 matmul runs while its w2 (a third of its
    bytes) still moves; the w2 matmul waits for the whole load. The output is unchanged."""
    source = FakeSource()
    store = ExpertStore(source, FORMAT, torch.device("cpu"), 2, None)
    backend = LocalExpertBackend(store, SlotCache(2), GRID, link=slow_link())
    seen = []
    up, down = SwiGLU.up, SwiGLU.down

    loads = []

    def traced(name, fn, key):
        def run(self, *args):
            loads.extend([backend.loads.future(key)] if not loads else [])  # gone once ended
            seen.append((name, loads[0].done()))
            return fn(self, *args)

        return run

    key = keys(3)[0]
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SwiGLU, "up", traced("up", up, key))
        mp.setattr(SwiGLU, "down", traced("down", down, key))
        out = backend.run({key: x})
    # bit for bit what a resident expert gives (the same two kernels on the same packed
    # weights); the separate-projection reference is another kernel, so only close to it
    w = source.weights[key]
    resident = SwiGLU(torch.cat([w["gate"], w["up"]]), w["down"])(x)
    assert torch.equal(out[key], resident)
    torch.testing.assert_close(out[key], reference(source, key, x))
    assert seen == [("up", False), ("down", True)]
    # the link takes w13's 0.13 s, then w2's 0.07 s; the compute thread waits for both but
    # on a busy CPU may itself start late (less wait) or wake late (more)
    assert 0.05 < backend.stats()["load_wait_seconds"] < 2.0
    backend.close()
