"""Prometheus metrics of the live loop (prometheus-client).

Per allocator the running values come from the shared :class:`MetricAccumulator`, so they equal
an offline computation over the same intervals. Per-site series are bounded: only the first
``max_sites`` sites seen get their own labels; all sites count in the per-allocator series.
"""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.engine import BatchResult
from forecaster.core.metrics import MetricAccumulator

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LoopMetrics:
    def __init__(self, allocators: list[str], sla_target: float, max_sites: int = 20,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.allocators = list(allocators)
        self.max_sites = max_sites
        self.site_labels: set[str] = set()
        self.accumulators = {a: MetricAccumulator() for a in allocators}
        self.forecast_abs_error_sum = 0.0
        self.forecast_n = 0

        def g(name: str, doc: str, labels: tuple[str, ...] = ("allocator",)) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.efficiency = g("dtwin_allocation_efficiency_ratio", "Latest scored interval: min(actual/allocated, 1)")
        self.efficiency_mean = g("dtwin_allocation_efficiency_mean_ratio", "Running mean efficiency")
        self.wastage = g("dtwin_allocation_wastage_ratio", "Latest interval: max((allocated-actual)/allocated, 0)")
        self.wastage_mean = g("dtwin_allocation_wastage_mean_ratio", "Running mean wastage")
        self.utilization = g("dtwin_allocation_utilization_ratio", "Latest scored interval: actual/allocated")
        self.utilization_mean = g("dtwin_allocation_utilization_mean_ratio",
                                  "Running mean utilization (intervals with allocated > 0 or actual = 0)")
        self.over = g("dtwin_allocation_overprovisioning_units",
                      "Latest scored interval: max(allocated-actual, 0), in demand units")
        self.over_mean = g("dtwin_allocation_overprovisioning_mean_units", "Running mean over-provisioning")
        self.under_ratio = g("dtwin_allocation_underprovisioning_ratio",
                             "Running share of scored intervals with actual > allocated")
        self.scored_total = Counter("dtwin_allocation_intervals_scored", "Intervals scored", ["allocator"], registry=r)
        self.under_total = Counter("dtwin_allocation_underprovisioned", "Under-provisioned intervals",
                                   ["allocator"], registry=r)
        self.site_efficiency = g("dtwin_site_efficiency_ratio", "Latest efficiency per site", ("allocator", "site"))
        self.site_over = g("dtwin_site_overprovisioning_units", "Latest over-provisioning per site",
                           ("allocator", "site"))
        self.site_under = Counter("dtwin_site_underprovisioned", "Under-provisioned intervals per site",
                                  ["allocator", "site"], registry=r)
        self.abs_error = Gauge("dtwin_forecast_absolute_error_units", "Latest |forecast - actual|", registry=r)
        self.abs_error_mean = Gauge("dtwin_forecast_absolute_error_mean_units", "Running mean |forecast - actual|",
                                    registry=r)
        self.samples = Counter("dtwin_samples_received", "KPI samples consumed and processed (rejects included)",
                               registry=r)
        self.last_batch = Gauge("dtwin_last_batch_processed_timestamp_seconds",
                                "Unix time the last batch of samples was fully processed", registry=r)
        self.commands = Counter("dtwin_commands_sent", "Allocation commands produced", registry=r)
        self.rejected = Counter("dtwin_samples_rejected", "Samples dead-lettered, by reason", ["reason"], registry=r)
        self.gaps = Counter("dtwin_window_gaps", "Samples after a gap in a site's series (window restarted)",
                            registry=r)
        self.inference = Histogram("dtwin_inference_batch_duration_seconds", "Model inference time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end = Histogram("dtwin_end_to_end_latency_seconds",
                                    "Sample arrival at the worker to its command acknowledged by the broker",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.from_produce = Histogram("dtwin_produce_to_command_latency_seconds",
                                      "Sample record timestamp (set by its producer) to its command acknowledged: "
                                      "adds the producer's batching and the Kafka transit", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.batch_size = Histogram("dtwin_batch_samples", "Samples per processed batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000), registry=r)
        self.model_info = Gauge("dtwin_model_info", "Active model artifact", ["name", "version", "sha256"], registry=r)
        self.model_swaps = Counter("dtwin_model_swaps", "Model artifact reloads, by result", ["result"], registry=r)
        self.sla_target = Gauge("dtwin_sla_target_ratio", "Configured target share of under-provisioned intervals",
                                registry=r)
        self.sla_target.set(sla_target)
        for a in allocators:
            self.scored_total.labels(a)
            self.under_total.labels(a)
        for result in ("loaded", "rejected"):
            self.model_swaps.labels(result)

    def observe_latency(self, messages) -> None:
        """For each message whose command was just acknowledged. ``time_in`` is set by Faust's
        monitor when the worker receives the record (monotonic clock)."""
        now_mono, now = time.monotonic(), time.time()
        for msg in messages:
            if msg.time_in is not None:
                self.end_to_end.observe(max(now_mono - msg.time_in, 0.0))
            self.from_produce.observe(max(now - msg.timestamp, 0.0))

    def batch_done(self, n_samples: int) -> None:
        self.samples.inc(n_samples)
        self.batch_size.observe(n_samples)
        self.last_batch.set_to_current_time()

    def set_model(self, name: str, version: str, sha256: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, sha256).set(1)

    def observe(self, result: BatchResult) -> None:
        s = result.scored
        if len(s):
            actual = np.asarray(s.actual)
            latest = self._labelled_latest(s.sites)
            for a in self.allocators:
                acc = self.accumulators[a]
                alloc = np.asarray(s.allocations[a])
                m = acc.add(actual, alloc)
                summary = acc.summary()
                last = acc.last
                self.efficiency.labels(a).set(last["efficiency"])
                self.wastage.labels(a).set(last["wastage"])
                self.utilization.labels(a).set(last["utilization"])
                self.over.labels(a).set(last["overprovisioning"])
                self.efficiency_mean.labels(a).set(summary["efficiency_mean"])
                self.wastage_mean.labels(a).set(summary["wastage_mean"])
                self.utilization_mean.labels(a).set(summary["utilization_mean"])
                self.over_mean.labels(a).set(summary["overprovisioning_mean"])
                self.under_ratio.labels(a).set(summary["underprovisioning_rate"])
                self.scored_total.labels(a).inc(len(actual))
                self.under_total.labels(a).inc(int(m.underprovisioned.sum()))
                for site, j in latest.items():
                    self.site_efficiency.labels(a, site).set(m.efficiency[j])
                    self.site_over.labels(a, site).set(m.overprovisioning[j])
                for j in np.flatnonzero(m.underprovisioned):
                    if s.sites[j] in self.site_labels:
                        self.site_under.labels(a, s.sites[j]).inc()
            abs_error = np.abs(np.asarray(s.forecast) - actual)
            self.forecast_abs_error_sum += float(abs_error.sum())
            self.forecast_n += len(abs_error)
            self.abs_error.set(float(abs_error[-1]))
            self.abs_error_mean.set(self.forecast_abs_error_sum / self.forecast_n)
        for _, reason, _ in result.rejects:
            self.rejected.labels(reason).inc()
        if result.gaps:
            self.gaps.inc(result.gaps)

    def _labelled_latest(self, sites: list[str]) -> dict[str, int]:
        """Index of each labelled site's latest interval in the batch; admits new sites up to the bound."""
        latest: dict[str, int] = {}
        for j, site in enumerate(sites):
            if site not in self.site_labels:
                if len(self.site_labels) >= self.max_sites:
                    continue
                self.site_labels.add(site)
            latest[site] = j
        return latest

    def summaries(self) -> dict[str, dict]:
        return {a: acc.summary() for a, acc in self.accumulators.items()}
