"""What ``/metrics`` exports, in Prometheus' text format.

Two kinds of series, all prefixed ``meswitch_``:

* counted by the server as requests go: ``requests_total`` (accepted, by expert and
  endpoint), ``request_errors_total`` (refused, by status), ``requests_finished_total`` (by
  expert and finish reason), ``prompt_tokens_total`` and ``generation_tokens_total`` (by
  expert), ``routed_total`` (``auto`` requests, by expert chosen and whether the router fell
  back), and the histograms ``time_to_first_token_seconds`` (request received -> first text),
  ``inter_token_latency_seconds`` (between tokens of one stream) and
  ``request_duration_seconds``, by expert;
* read from the engine and the store when scraped, so they are never stale:
  ``requests_waiting``, ``requests_running``, ``preemptions_total``, ``kv_blocks_total``,
  ``kv_blocks_free``, and the store's ``store_bytes`` / ``store_budget_bytes`` /
  ``store_experts`` by tier (``disk``, ``host``) and its counters ``store_hits_total``,
  ``store_misses_total``, ``store_evictions_total``, ``store_loads_total``,
  ``store_load_failures_total``; and per expert ``expert_resident`` (by expert and tier, 1 or
  0), ``expert_holders``, ``expert_requests`` (requests that claim it), ``expert_loads_total``, ``expert_load_seconds_total``,
  ``expert_lease_waits_total`` and ``expert_lease_wait_seconds_total`` (acquires that found the
  expert not resident, and what they waited).

Every series lives in the server's own registry, not prometheus_client's global one, so
two servers in one process (tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: The label value of the base model.
BASE = "base"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _LiveCollector(Collector):
    """The engine's queues and KV pool and the store's tiers, read at every scrape."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]], store_report: Callable[[], dict[str, Any]]) -> None:
        self._engine_stats = engine_stats
        self._store_report = store_report

    def collect(self) -> Iterator[Any]:
        stats = self._engine_stats()
        for key, help_text in (("waiting", "requests waiting for admission (queue depth)"),
                               ("running", "requests running in the engine's batch")):
            yield GaugeMetricFamily(f"meswitch_requests_{key}", help_text, value=stats[key])
        yield CounterMetricFamily("meswitch_preemptions", "running requests preempted for KV blocks (recomputed)",
                                  value=stats["preempted_total"])
        yield GaugeMetricFamily("meswitch_kv_blocks_total", "blocks of the paged KV cache",
                                value=stats["kv_blocks_total"])
        yield GaugeMetricFamily("meswitch_kv_blocks_free", "free blocks of the paged KV cache",
                                value=stats["kv_blocks_free"])

        report = self._store_report()
        used = GaugeMetricFamily("meswitch_store_bytes", "bytes of experts in the tier (host: resident + loading)",
                                 labels=["tier"])
        budget = GaugeMetricFamily("meswitch_store_budget_bytes", "byte budget of the tier (0: none)", labels=["tier"])
        entries = GaugeMetricFamily("meswitch_store_experts", "experts resident in the tier", labels=["tier"])
        for tier, values in sorted(report["tiers"].items()):
            used.add_metric([tier], values["used_bytes"])
            budget.add_metric([tier], values["budget_bytes"])
            entries.add_metric([tier], values["entries"])
        yield from (used, budget, entries)
        for key, help_text in (("hits", "acquires that found the expert resident"),
                               ("misses", "acquires that had to load the expert"),
                               ("evictions", "experts evicted from host memory"),
                               ("loads", "expert loads into host memory"),
                               ("load_failures", "expert loads that failed")):
            yield CounterMetricFamily(f"meswitch_store_{key}", help_text, value=report[key])
        yield from _per_expert(report["experts"])


def _per_expert(experts: list[dict[str, Any]]) -> Iterator[Any]:
    """Each expert's residency, loads and waits, from the store's report (labels: expert, tier)."""
    resident = GaugeMetricFamily("meswitch_expert_resident", "1 while the expert is resident in the tier, else 0",
                                 labels=["expert", "tier"])
    holders = GaugeMetricFamily("meswitch_expert_holders", "holds on the expert now (running requests and batches)",
                                labels=["expert"])
    claims = GaugeMetricFamily("meswitch_expert_requests", "requests that claim the expert now (accepted, not ended)",
                               labels=["expert"])
    loads = CounterMetricFamily("meswitch_expert_loads", "loads of the expert into host memory", labels=["expert"])
    load_seconds = CounterMetricFamily("meswitch_expert_load_seconds", "seconds spent loading the expert",
                                       labels=["expert"])
    waits = CounterMetricFamily("meswitch_expert_lease_waits",
                                "acquires that found the expert not resident and waited for its load",
                                labels=["expert"])
    wait_seconds = CounterMetricFamily("meswitch_expert_lease_wait_seconds", "seconds those acquires waited",
                                       labels=["expert"])
    for expert in experts:
        name = expert["name"]
        resident.add_metric([name, "host"], 1 if expert["tier"] == "host" else 0)
        holders.add_metric([name], expert["holders"])
        claims.add_metric([name], expert["claims"])
        loads.add_metric([name], expert["loads"])
        load_seconds.add_metric([name], expert["load_seconds"])
        waits.add_metric([name], expert["waited_acquires"])
        wait_seconds.add_metric([name], expert["wait_seconds"])
    yield from (resident, holders, claims, loads, load_seconds, waits, wait_seconds)


class ServerMetrics:
    """The server's Prometheus registry and the series it counts (see the module docstring).

    Parameters
    ----------
    engine_stats
        Returns the engine's ``stats()``.
    store_report
        Returns the store's ``memory_report()``.
    """

    def __init__(self, engine_stats: Callable[[], dict[str, Any]], store_report: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("meswitch_requests", "requests accepted", ["expert", "endpoint"], registry=registry)
        self.request_errors = Counter("meswitch_request_errors", "requests refused or failed, by HTTP status",
                                      ["status"], registry=registry)
        self.finished = Counter("meswitch_requests_finished", "requests ended, by finish reason",
                                ["expert", "finish_reason"], registry=registry)
        self.prompt_tokens = Counter("meswitch_prompt_tokens", "prompt tokens of accepted requests", ["expert"],
                                     registry=registry)
        self.generation_tokens = Counter("meswitch_generation_tokens", "tokens generated", ["expert"],
                                         registry=registry)
        self.routed = Counter("meswitch_routed", "model 'auto' requests, by the expert the router chose",
                              ["expert", "fallback"], registry=registry)
        self.time_to_first_token = Histogram("meswitch_time_to_first_token_seconds",
                                             "request received -> first generated text", ["expert"],
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("meswitch_inter_token_latency_seconds",
                                             "time between consecutive generated tokens of a request", ["expert"],
                                             buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.request_duration = Histogram("meswitch_request_duration_seconds", "request received -> last token",
                                          ["expert"], buckets=DURATION_BUCKETS, registry=registry)
        registry.register(_LiveCollector(engine_stats, store_report))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestTimer:
    """Times one request's tokens into the latency histograms as its events arrive.

    Parameters
    ----------
    metrics
        The server's metrics.
    expert
        The expert's label (``"base"`` for the base).
    received
        ``time.monotonic()`` when the request arrived.
    """

    def __init__(self, metrics: ServerMetrics, expert: str, received: float) -> None:
        self._metrics = metrics
        self.expert = expert
        self.received = received
        self._last: float | None = None
        self.finished = False

    def tokens(self, count: int, at: float) -> None:
        """``count`` new tokens arrived at monotonic time ``at`` (one engine event)."""
        if count <= 0:
            return
        if self._last is None:
            self._metrics.time_to_first_token.labels(self.expert).observe(max(0.0, at - self.received))
            count -= 1  # the first token has no gap before it
            self._last = at
        if count:
            # An event may carry several tokens (text held back for a stop string); each gets
            # an equal share of the wait, so the histogram still counts tokens, not events.
            gap = max(0.0, at - self._last) / count
            histogram = self._metrics.inter_token_latency.labels(self.expert)
            for _ in range(count):
                histogram.observe(gap)
        self._last = at

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, at: float) -> None:
        """The request ended: its token counts and duration."""
        self.finished = True
        self._metrics.finished.labels(self.expert, reason).inc()
        self._metrics.prompt_tokens.labels(self.expert).inc(prompt_tokens)
        self._metrics.generation_tokens.labels(self.expert).inc(completion_tokens)
        self._metrics.request_duration.labels(self.expert).observe(max(0.0, at - self.received))

    def cancelled(self) -> None:
        """The request was cancelled (its client left) before it finished; nothing when it had finished."""
        if not self.finished:
            self.finished = True
            self._metrics.finished.labels(self.expert, "cancelled").inc()


__all__ = ["BASE", "RequestTimer", "ServerMetrics"]
