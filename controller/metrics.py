"""Prometheus metrics of the live loop (prometheus-client).

Every figure is a counter or a ``_sum``/``_count`` pair, so any mean or rate aggregates across
workers and restarts: ``sum(rate(x_sum[w])) / sum(rate(x_count[w]))``. The sums come from the shared
:class:`forecaster.core.metrics.MetricAccumulator`, so they equal an offline computation over the
same intervals. Per-site series are bounded: the first ``max_sites`` sites seen get their own
``site`` label, the others are counted under ``site="_other"``. The summary endpoint keeps every
site's scored and under-provisioned counts (two integers per site and allocator).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from contracts.messages import REJECT_REASONS
from controller.engine import BatchResult
from forecaster.core.metrics import MetricAccumulator

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OTHER_SITES = "_other"
SWAP_REFUSAL_REASONS = ("manifest", "missing_file", "sha256", "onnx", "opset", "shape", "non_finite", "canary",
                        "load_error")
# (metric name suffix, accumulator sum attribute, accumulator count attribute, help)
_SUMS = (
    ("efficiency_ratio", "sum_efficiency", "n", "Per scored interval: min(actual/allocated, 1)"),
    ("wastage_ratio", "sum_wastage", "n", "Per scored interval: max((allocated-actual)/allocated, 0)"),
    ("utilization_ratio", "sum_utilization", "n_utilization",
     "Per scored interval where defined: actual/allocated"),
    ("overprovisioning_units", "sum_overprovisioning", "n", "Per scored interval: max(allocated-actual, 0)"),
    ("underprovisioning_units", "sum_underprovisioned_amount", "n", "Per scored interval: max(actual-allocated, 0)"),
)


class _Scores(Collector):
    """Exports the accumulators as counters and quantile-free summaries at scrape time."""

    def __init__(self, owner: FleetMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterable:
        o = self.owner
        scored = CounterMetricFamily("dtwin_allocation_intervals_scored", "Intervals scored, per allocator",
                                     labels=["allocator"])
        under = CounterMetricFamily("dtwin_allocation_underprovisioned_intervals",
                                    "Scored intervals with actual > allocated", labels=["allocator"])
        sums = {name: SummaryMetricFamily(f"dtwin_allocation_{name}", doc, labels=["allocator"])
                for name, _, _, doc in _SUMS}
        for a, acc in sorted(o.fleet.items()):
            scored.add_metric([a], acc.n)
            under.add_metric([a], acc.n_underprovisioned)
            for name, sum_attr, count_attr, _ in _SUMS:
                sums[name].add_metric([a], getattr(acc, count_attr), getattr(acc, sum_attr))
        site_scored = CounterMetricFamily("dtwin_site_intervals_scored", "Intervals scored, per site",
                                          labels=["allocator", "site"])
        site_under = CounterMetricFamily("dtwin_site_underprovisioned_intervals",
                                         "Under-provisioned intervals, per site", labels=["allocator", "site"])
        site_over = SummaryMetricFamily("dtwin_site_overprovisioning_units", "Over-provisioning per site",
                                        labels=["allocator", "site"])
        for (a, site), acc in sorted(o.site_acc.items()):
            site_scored.add_metric([a, site], acc.n)
            site_under.add_metric([a, site], acc.n_underprovisioned)
            site_over.add_metric([a, site], acc.n, acc.sum_overprovisioning)
        errors = [SummaryMetricFamily("dtwin_forecast_absolute_error_units", "|forecast - actual| per scored interval",
                                      labels=["role"]),
                  SummaryMetricFamily("dtwin_forecast_squared_error_units", "(forecast - actual)^2 per scored interval",
                                      labels=["role"])]
        for role, (n, abs_sum, sq_sum) in sorted(o.forecast_errors.items()):
            errors[0].add_metric([role], n, abs_sum)
            errors[1].add_metric([role], n, sq_sum)
        yield from (scored, under, *sums.values(), site_scored, site_under, site_over, *errors)


class FleetMetrics:
    def __init__(self, allocators: Iterable[str], sla_target: float, max_sites: int = 20,
                 registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = r = registry or CollectorRegistry()
        if process_collectors:
            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(c)
        self.max_sites = max_sites
        self.fleet: dict[str, MetricAccumulator] = {a: MetricAccumulator() for a in allocators}
        self.site_acc: dict[tuple[str, str], MetricAccumulator] = {}
        self.labelled: set[str] = set()
        # allocator -> site -> [scored, under-provisioned], every site (for the summary's distribution)
        self.per_site: dict[str, dict[str, list[int]]] = {}
        self.forecast_errors: dict[str, list[float]] = {"active": [0, 0.0, 0.0]}
        r.register(_Scores(self))

        self.site_demand = Gauge("dtwin_site_demand_units", "Latest scored actual demand, per site", ["site"],
                                 registry=r)
        self.site_forecast = Gauge("dtwin_site_forecast_units", "Forecast for the latest scored interval, per site",
                                   ["site"], registry=r)
        self.site_allocated = Gauge("dtwin_site_allocated_units", "Allocation for the latest scored interval",
                                    ["allocator", "site"], registry=r)
        self.site_headroom = Gauge("dtwin_site_headroom_ratio", "Online scale-free headroom q, per site",
                                   ["allocator", "site"], registry=r)
        self.samples = Counter("dtwin_samples_received", "KPI sample records consumed (rejects included)",
                               registry=r)
        self.commands = Counter("dtwin_commands_sent", "Allocation commands produced, by policy", ["policy"],
                                registry=r)
        self.rejected = Counter("dtwin_samples_rejected", "Records dead-lettered, by reason", ["reason"], registry=r)
        self.gaps = Counter("dtwin_window_gaps", "Samples after a gap in a site's series (window restarted)",
                            registry=r)
        self.state_resets = Counter("dtwin_state_resets", "Site states reset because they failed to decode",
                                    ["reason"], registry=r)
        self.reemitted = Counter("dtwin_commands_reemitted",
                                 "Commands re-sent identically from state for a redelivered sample", registry=r)
        self.redelivered = Counter("dtwin_samples_redelivered", "Records at or before a site's stored offset",
                                   registry=r)
        self.rebalances = Counter("dtwin_rebalances", "Partition assignments received", registry=r)
        self.recoveries = Counter("dtwin_table_recoveries", "Table recoveries completed", registry=r)
        self.fetch_skips = Counter("dtwin_fetch_skips", "Jumps in a source partition's offsets: records skipped",
                                   registry=r)
        self.batch_retries = Counter("dtwin_batch_retries", "Deliveries of a batch retried after an error",
                                     registry=r)
        self.inference = Histogram("dtwin_inference_batch_duration_seconds", "Model inference time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end = Histogram("dtwin_end_to_end_latency_seconds",
                                    "Sample arrival at the worker to its command acknowledged by the broker",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.from_produce = Histogram("dtwin_produce_to_command_latency_seconds",
                                      "Sample record timestamp (set by its producer) to its command acknowledged",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("dtwin_batch_samples", "Samples per processed batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000), registry=r)
        self.last_batch = Gauge("dtwin_last_batch_processed_timestamp_seconds",
                                "Unix time the last batch of samples was fully processed", registry=r)
        self.lag = Gauge("dtwin_consumer_lag_records", "Records behind the end offset, per assigned partition",
                         ["topic", "partition"], registry=r)
        self.assigned = Gauge("dtwin_assigned_partitions", "Source partitions assigned to this worker", registry=r)
        self.model_info = Gauge("dtwin_model_info", "Served model artifacts", ["role", "name", "version", "sha256"],
                                registry=r)
        self.model_swaps = Counter("dtwin_model_swaps", "Model artifacts taken into service", registry=r)
        self.swap_refusals = Counter("dtwin_model_swap_refusals", "Model artifacts refused, by reason", ["reason"],
                                     registry=r)
        self.serving_last_good = Gauge("dtwin_model_serving_last_good",
                                       "1 while the worker serves its last verified model because current failed",
                                       registry=r)
        self.sla_target = Gauge("dtwin_sla_target_ratio", "Target share of under-provisioned intervals", registry=r)
        self.sla_target.set(sla_target)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in SWAP_REFUSAL_REASONS:
            self.swap_refusals.labels(reason)
        self.state_resets.labels("corrupt")

    def _site_label(self, site: str) -> str:
        if site in self.labelled:
            return site
        if len(self.labelled) < self.max_sites:
            self.labelled.add(site)
            return site
        return OTHER_SITES

    def reset_allocators(self, names: Iterable[str]) -> None:
        """Start these allocators' scores afresh (a new candidate: compare it on its own intervals only)."""
        for a in names:
            self.fleet[a] = MetricAccumulator()
            self.per_site.pop(a, None)
            for key in [k for k in self.site_acc if k[0] == a]:
                del self.site_acc[key]
        if "candidate" in names:
            self.forecast_errors.pop("candidate", None)

    def observe(self, result: BatchResult, headroom: dict[str, dict[str, float]] | None = None) -> None:
        """Score one batch; ``headroom`` is site -> {allocator: q} after it."""
        for a, sc in result.scores.items():
            actual = np.asarray(sc.actual)
            allocated = np.asarray(sc.allocated)
            acc = self.fleet.setdefault(a, MetricAccumulator())
            m = acc.add(actual, allocated)
            counts = self.per_site.setdefault(a, {})
            labels = [self._site_label(s) for s in sc.sites]
            for j, site in enumerate(sc.sites):
                c = counts.setdefault(site, [0, 0])
                c[0] += 1
                c[1] += int(m.underprovisioned[j])
            for label in set(labels):
                idx = [j for j, lab in enumerate(labels) if lab == label]
                self.site_acc.setdefault((a, label), MetricAccumulator()).add(actual[idx], allocated[idx])
        for role, errors in result.forecast_errors.items():
            if errors:
                e = np.asarray(errors)
                acc3 = self.forecast_errors.setdefault(role, [0, 0.0, 0.0])
                acc3[0] += len(e)
                acc3[1] += float(np.abs(e).sum())
                acc3[2] += float((e * e).sum())
        for site, (actual_v, forecast, allocs) in result.latest.items():
            label = self._site_label(site)
            if label == OTHER_SITES:
                continue
            self.site_demand.labels(site).set(actual_v)
            self.site_forecast.labels(site).set(forecast)
            for a, v in allocs.items():
                self.site_allocated.labels(a, site).set(v)
        for site, qs in (headroom or {}).items():
            if site in self.labelled:
                for a, q in qs.items():
                    self.site_headroom.labels(a, site).set(q)
        for _, reason, _ in result.rejects:
            self.rejected.labels(reason).inc()
        if result.gaps:
            self.gaps.inc(result.gaps)
        if result.redelivered:
            self.redelivered.inc(result.redelivered)

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

    def set_model(self, role: str, name: str | None, version: str | None, sha256: str | None) -> None:
        for labels in [k for k in self.model_info._metrics if k[0] == role]:
            self.model_info.remove(*labels)
        if version is not None:
            self.model_info.labels(role, name or "", version, sha256 or "").set(1)

    def summary(self) -> dict:
        """Fleet figures per allocator (report.json's keys) and the per-site under-provisioning spread."""
        allocators = {a: acc.summary() for a, acc in sorted(self.fleet.items()) if acc.n}
        per_site = {}
        for a, counts in sorted(self.per_site.items()):
            rates = np.asarray([u / n for n, u in counts.values() if n])
            if rates.size:
                per_site[a] = {"underprovisioning_rate": {
                    "min": float(rates.min()), "median": float(np.median(rates)),
                    "p90": float(np.percentile(rates, 90)), "max": float(rates.max())}, "sites": int(rates.size)}
        sites = max((len(c) for c in self.per_site.values()), default=0)
        return {"allocators": allocators, "per_site": per_site, "sites": sites,
                "site_rates": {a: {s: {"scored": n, "underprovisioned": u} for s, (n, u) in sorted(c.items())}
                               for a, c in sorted(self.per_site.items())}}
