"""Prometheus metrics (`--enable-metrics`), read from the engine at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from rollserve.engine.api import EngineAPI

PREFIX = "rollserve:"


class EngineCollector(Collector):
    def __init__(self, engine: EngineAPI) -> None:
        self.engine = engine

    def collect(self) -> Iterator:
        stats = self.engine.stats()
        yield _gauge("num_running_reqs", "requests in the running batch", stats["num_running_reqs"])
        yield _gauge("num_queue_reqs", "requests waiting for admission", stats["num_waiting_reqs"])
        yield _gauge("token_usage", "share of the KV pool in use",
                     stats["kv_used_tokens"] / stats["kv_pool_size"])
        yield _gauge("cache_hit_rate", "prompt tokens served from the radix cache",
                     stats["cached_tokens"] / max(stats["prompt_tokens"], 1))
        yield _counter("prompt_tokens", "prompt tokens received", stats["prompt_tokens"])
        yield _counter("generation_tokens", "tokens generated", stats["generated_tokens"])
        for name, histogram in self.engine.latency_histograms().items():
            family = HistogramMetricFamily(PREFIX + name, name.replace("_", " "))
            family.add_metric([], histogram.cumulative(), histogram.total)
            yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


class ServerMetrics:
    """One registry per server (no process-global metric state)."""

    def __init__(self, engine: EngineAPI) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
