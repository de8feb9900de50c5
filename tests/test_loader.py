"""Tier 1: the link loader's order, promotion, cancellation and estimates; the miss cost model."""

from __future__ import annotations

import threading

import pytest
import torch

from offload_rt.experts.loader import LinkLoader
from offload_rt.experts.misscost import MissCost
from offload_rt.model import SwiGLU

MB = 10**6


class Gate:
    """A first job that holds the worker until released, so the rest stay queued."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        assert self.release.wait(timeout=10)


def test_demand_before_prefetch_promotion_and_cancel():
    loader = LinkLoader(bytes_per_s=1e9)
    order: list[str] = []
    gate = Gate()
    loader.submit(gate, MB, urgent=False)
    assert gate.entered.wait(timeout=10)
    spec_a = loader.submit(lambda: order.append("spec a"), MB, urgent=False)
    spec_b = loader.submit(lambda: order.append("spec b"), MB, urgent=False)
    spec_c = loader.submit(lambda: order.append("spec c"), MB, urgent=False)
    loader.submit(lambda: order.append("demand"), MB, urgent=True)
    loader.promote(spec_b)
    assert loader.cancel(spec_c) and spec_c.cancelled()
    gate.release.set()
    spec_a.result(timeout=10)
    assert order == ["demand", "spec b", "spec a"]
    assert not loader.cancel(spec_a)  # done: nothing to cancel
    loader.close()


def test_eta_counts_the_loads_ahead():
    loader = LinkLoader(bytes_per_s=MB)  # 1 s per MB: estimates far above any scheduling noise
    gate = Gate()
    loader.submit(gate, 4 * MB, urgent=True)
    assert gate.entered.wait(timeout=10)
    queued = loader.submit(lambda: None, 2 * MB, urgent=False)
    running_left = loader.eta(nbytes=0)
    assert 3.0 < running_left <= 4.0
    assert loader.eta(queued) == pytest.approx(running_left + 2.0, abs=0.2)
    # a new (urgent) load would pass the queued prefetch
    assert loader.eta(nbytes=MB) == pytest.approx(running_left + 1.0, abs=0.2)
    gate.release.set()
    queued.result(timeout=10)
    assert loader.eta(queued) == 0.0
    loader.close()


def test_an_unknown_link_is_learnt_from_the_loads():
    loader = LinkLoader()
    assert loader.eta(nbytes=MB) is None
    loader.submit(lambda: threading.Event().wait(0.01), 10 * MB, urgent=True).result(timeout=10)
    assert 0 < loader.bytes_per_s <= 10 * MB / 0.01
    assert loader.eta(nbytes=MB) is not None
    loader.close()


def test_a_failed_load_hands_its_error_to_the_waiter():
    loader = LinkLoader(bytes_per_s=1e9)

    def fail() -> None:
        raise OSError("disk error reading layer 0 expert 3")

    with pytest.raises(OSError, match="expert 3"):
        loader.submit(fail, MB, urgent=True).result(timeout=10)
    assert loader.submit(lambda: None, MB, urgent=True).result(timeout=10) is None
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader.submit(lambda: None, MB, urgent=True)


def test_miss_cost_on_a_cpu_device_prefers_the_cpu_whenever_the_link_waits():
    cost = MissCost(device_is_host=True)
    never = lambda: pytest.fail("a CPU device needs no calibration")  # noqa: E731
    assert cost.prefer_host(1, 1e-6, never)
    assert not cost.prefer_host(1, 0.0, never)  # already there
    assert not cost.prefer_host(1, None, never)  # unknown link: copy and learn it


def test_miss_cost_behind_a_gpu_link_compares_measured_cpu_time_with_the_copy():
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(2 * 96, 64, generator=gen), torch.randn(64, 96, generator=gen)
    cost = MissCost(device_is_host=False)
    assert cost.prefer_host(1, 10.0, lambda: SwiGLU(w13, w2))  # a 10 s copy: the CPU wins
    assert cost.host_fixed_s is not None and 0 < cost.host_fixed_s < 1.0
    assert not cost.prefer_host(1, 1e-9, lambda: SwiGLU(w13, w2))  # a 1 ns copy: copy
    scripted = MissCost(device_is_host=False, host_fixed_s=0.002, host_row_s=0.001)
    assert scripted.host_seconds(5) == pytest.approx(0.006)
    assert scripted.prefer_host(1, 0.003, lambda: SwiGLU(w13, w2))
    assert not scripted.prefer_host(5, 0.003, lambda: SwiGLU(w13, w2))  # more rows: copy wins


def test_worker_runs_on_one_openmp_thread_and_leaves_the_others_theirs():
    """The worker's torch ops must not start a second OpenMP team (see loader.py); the thread
    that made the loader, and threads started after it, keep the process's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = LinkLoader(bytes_per_s=None)
        seen: list[int] = []
        loader.submit(lambda: seen.append(torch.get_num_threads()), MB, urgent=True).result(10)
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join(10)
        loader.close()
        assert seen == [1] and later == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
