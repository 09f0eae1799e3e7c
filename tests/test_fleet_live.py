"""Counter-based figures aggregate across workers and restarts: a real-data replay split across two
workers on Apache Kafka, one of them restarted midway; the summed counters equal the offline computation
(the same engine over the same samples, scored with the shared metric code) to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.messages import Sample
from contracts.topics import Topics
from dtwin.commands.recovery import wait_drained
from dtwin.runner import scrape, start_controller, value, wait_until
from dtwin.topics import create_topics
from forecaster.core.metrics import summarize
from replay.producer import DEFAULT_BASE_TS, make_producer, replay
from replay.sites import replay_sites
from tests.test_engine import make_engine, run

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

WARMUP = 120
HALF = 300  # intervals per half
N_SITES = 6
SUMS = (("efficiency_ratio", "efficiency_mean"), ("overprovisioning_units", "overprovisioning_mean"),
        ("wastage_ratio", "wastage_mean"), ("underprovisioning_units", "underprovisioned_amount_mean"))


def totals(scrapes: list[dict], allocator: str) -> dict[str, float]:
    """Counter totals over worker lifetimes: each scrape is one process's last values (a restart resets them,
    as Prometheus's increase() sees it)."""
    out: dict[str, float] = {}
    for m in scrapes:
        out["n"] = out.get("n", 0) + value(m, "dtwin_allocation_intervals_scored_total", allocator=allocator)
        out["under"] = out.get("under", 0) + value(m, "dtwin_allocation_underprovisioned_intervals_total",
                                                    allocator=allocator)
        for name, _ in SUMS:
            for part in ("sum", "count"):
                key = f"{name}_{part}"
                out[key] = out.get(key, 0) + value(m, f"dtwin_allocation_{key}", allocator=allocator)
    return out


def test_counters_summed_over_two_workers_and_a_restart_equal_offline(kafka, artifact_dir, real_site, tmp_path):
    from export.artifact import load_artifact

    sites = [s.slice(0, 2 * HALF) for s in replay_sites(N_SITES, bases=[real_site])]
    topics = Topics("fleet2.")
    create_topics(kafka.bootstrap, topics, 4, app_id="fleet2")
    env = {"DTWIN_CHANGELOG_MARKERS": "0", "DTWIN_BASELINE_WARMUP_INTERVALS": str(WARMUP)}

    def worker(name: str):
        return start_controller(kafka.bootstrap, artifact_dir, tmp_path, topics.prefix, "fleet2", 4, extra_env=env,
                                log_name=f"{name}.log", worker=name)

    a, b = worker("a"), worker("b")
    final_scrapes: list[dict] = []
    try:
        def received(*workers) -> float:
            return sum(value(w.metrics() or {}, "dtwin_samples_received_total") for w in workers)

        producer = make_producer(kafka.bootstrap)
        first = replay(producer, topics.samples, sites, limit=HALF, progress=False)
        wait_until(lambda: received(a, b) >= first.acked, 240, 0.5, "both workers to process the first half",
                   lambda: a.alive() and b.alive())
        wait_until(lambda: (b.metrics() or {}) and value(b.metrics(), "dtwin_samples_received_total") > 0, 5, 0.2,
                   "worker b to have taken a share")
        final_scrapes.append(scrape(b.metrics_port))  # b's lifetime ends here
        b.stop()
        quarter = HALF // 2
        second = replay(producer, topics.samples, sites, start=HALF, limit=quarter, progress=False)  # a alone
        b = worker("b")
        wait_until(lambda: value(b.metrics() or {}, "dtwin_assigned_partitions") > 0, 180, 0.5,
                   "the restarted worker b to get partitions back", lambda: a.alive() and b.alive())
        third = replay(producer, topics.samples, sites, start=HALF + quarter, limit=HALF - quarter, progress=False)
        producer.close()
        assert first.acked + second.acked + third.acked == len(sites) * 2 * HALF
        # Processed means committed up to the end: a count of received records would include redeliveries.
        wait_drained(kafka.bootstrap, "fleet2", topics.samples, 300, lambda: a.alive() and b.alive())
        final_scrapes += [scrape(a.metrics_port), scrape(b.metrics_port)]
        assert value(final_scrapes[-1], "dtwin_samples_received_total") > 0, "the restarted worker took no share"
    finally:
        a.stop()
        b.stop()

    # Offline: the same engine over the same samples (site by site, in order), scored with the shared code.
    art = load_artifact(artifact_dir)
    engine = make_engine(art, warmup=WARMUP)
    samples = [Sample(s.name, DEFAULT_BASE_TS + int(s.timestamps[i]), tuple(float(v) for v in s.values[i]))
               for s in sites for i in range(2 * HALF)]
    _, offline = run(engine, samples, 500)
    received_total = sum(value(m, "dtwin_samples_received_total") for m in final_scrapes)
    assert received_total >= len(samples)  # redeliveries after the restart are counted as received
    for name in ("ai_sla", "ai_sla_static", "persistence_sla", "b1", "b2"):
        sc = offline["scores"][name]
        ref = summarize(np.asarray(sc["actual"]), np.asarray(sc["allocated"]))
        live = totals(final_scrapes, name)
        assert live["n"] == ref["n"] == N_SITES * (2 * HALF - WARMUP), name
        assert live["under"] / live["n"] == pytest.approx(ref["underprovisioning_rate"], abs=1e-9), name
        for metric, key in SUMS:
            got = live[f"{metric}_sum"] / live[f"{metric}_count"]
            assert got == pytest.approx(ref[key], abs=1e-6), (name, metric)
