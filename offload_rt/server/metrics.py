"""Prometheus metrics, read from the scheduler and the expert backend at scrape time.

A registry per server (no process-wide globals), so tests can run several servers at once.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from offload_rt.server.engine import ServingEngine

PREFIX = "offload_rt"


class EngineCollector(Collector):
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        sched = self.engine.scheduler
        s = sched.stats
        yield _gauge("queue_depth", "requests waiting for a batch row", sched.queue_depth())
        yield _gauge("running_requests", "requests in the running batch", sched.running())
        yield _gauge(
            "tokens_per_second", "tokens generated per second, last 10 s", sched.tokens_per_second()
        )
        yield _counter("generated_tokens", "tokens generated", s.generated_tokens)
        outcomes = CounterMetricFamily(
            f"{PREFIX}_scheduled_requests", "requests by outcome", labels=["outcome"]
        )
        for outcome in ("submitted", "completed", "cancelled", "failed", "refused"):
            outcomes.add_metric([outcome], getattr(s, outcome))
        yield outcomes
        yield _counter("decode_steps", "batched decode steps", s.steps)
        yield _counter("decode_step_rows", "requests summed over decode steps", s.step_rows)
        yield from self._cache()

    def _cache(self) -> Iterator[Metric]:
        stats = self.engine.model.stats()
        hits, misses = stats.get("hits", 0), stats.get("misses", 0)
        rate = hits / (hits + misses) if hits + misses else 0.0
        yield _gauge("expert_cache_hit_rate", "expert lookups that found it resident", rate)
        for name in ("hits", "misses", "evictions", "bytes_loaded"):
            if name in stats:
                yield _counter(f"expert_cache_{name}", f"expert cache {name}", stats[name])
        for name in ("resident", "resident_max"):
            if name in stats:
                yield _gauge(f"expert_cache_{name}", f"experts {name} on the device", stats[name])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class Metrics:
    def __init__(self, engine: ServingEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
