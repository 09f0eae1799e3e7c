"""The closed loop on Apache Kafka with real data, and one smoke test on the embedded Tansu broker.

Two controllers run side by side on the session's Kafka: one gets a clean replay of three sites derived
from the real dataset, the other a stream laced with bad input. Every command is compared with the
offline engine over the same samples, the live summary with the shared metric code over the offline
engine's scores, and the commands topic is read again with kcat, as an operator's client would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts.messages import MAX_SAMPLE_BYTES, REJECT_REASONS, TS_MAX, encode_sample
from dtwin.commands.recovery import (
    Audit,
    Fleet,
    Offline,
    PacedSender,
    Record,
    audit,
    good_samples,
    offline_engine,
    read_to_end,
    run_offline,
    sample_records,
    site_partition,
    wait_drained,
)
from dtwin.commands.up import fetch_summary
from dtwin.runner import scrape, value, wait_until
from forecaster.core.metrics import SUMMARY_KEYS, summarize
from replay.producer import make_producer, replay
from replay.sites import replay_sites
from tests.brokers import kcat_read
from tests.faults_util import WARMUP, report
from tests.kafka_util import WAIT, read_topic

pytestmark = pytest.mark.kafka

INTERVALS = 1000  # per site: 3 sites x 1,000 real samples
PARTITIONS = 2
STEP = 300


@pytest.fixture(scope="module")
def fleets(kafka, artifact_dir, tmp_path_factory):
    """The clean and the laced controller, started together (their group joins overlap)."""
    run_dir = tmp_path_factory.mktemp("loop")
    made = {name: Fleet(kafka.bootstrap, f"loop-{name}.", f"loop-{name}", PARTITIONS, artifact_dir, run_dir,
                        {"DTWIN_BASELINE_WARMUP_INTERVALS": str(WARMUP)}) for name in ("clean", "bad")}
    for fleet in made.values():
        fleet.start("w1")
    for fleet in made.values():
        fleet.wait_assigned({"w1": PARTITIONS})
    yield made
    for fleet in made.values():
        fleet.close()


@dataclass
class CleanRun:
    fleet: Fleet
    records: list[Record]
    offline: Offline
    commands: list
    result: Audit
    summary: dict
    metrics: dict


@pytest.fixture(scope="module")
def clean(kafka, fleets, artifact_dir, real_site) -> CleanRun:
    """The real replay producer streams the sites as fast as it can; the worker drains them."""
    fleet = fleets["clean"]
    sites = [s.slice(0, INTERVALS) for s in replay_sites(3, bases=[real_site])]
    producer = make_producer(kafka.bootstrap)
    stats = replay(producer, fleet.topics.samples, sites, progress=False)
    producer.close()
    assert stats.acked == 3 * INTERVALS and stats.failed == 0
    w = fleet.workers["w1"]
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 120, w.alive)
    records = sample_records(sites, PARTITIONS)  # the same bytes the replay sent
    offline = run_offline(offline_engine(artifact_dir, WARMUP), good_samples(records))
    commands = read_to_end(kafka.bootstrap, fleet.topics.commands)
    return CleanRun(fleet, records, offline, commands, audit(commands, offline.decisions), fetch_summary(w),
                    scrape(w.metrics_port))


@pytest.mark.timeout(300)
def test_every_interval_gets_exactly_the_offline_command(clean, record_property):
    r = clean.result
    report(record_property, "loop_clean", {**r.figures(), "samples": len(clean.records)})
    assert not r.problems(), r.problems()
    assert r.duplicates == 0 and r.commands == len(clean.records) == 3 * INTERVALS
    policies = {}
    for c in clean.offline.decisions.values():
        policies[c.policy] = policies.get(c.policy, 0) + 1
    assert policies == {"fallback": 3 * 9, "ai_sla": 3 * (INTERVALS - 9)}
    for policy, n in policies.items():
        assert value(clean.metrics, "dtwin_commands_sent_total", policy=policy) == n
    assert value(clean.metrics, "dtwin_samples_received_total") == len(clean.records)
    assert sum(clean.metrics["dtwin_samples_rejected_total"].values()) == 0


@pytest.mark.timeout(300)
def test_live_summary_equals_the_offline_metrics(clean):
    live = clean.summary["allocators"]
    assert set(live) == set(clean.offline.scores) >= {"ai_sla", "ai_raw", "b1", "b2", "persistence_sla"}
    for name, (actual, allocated) in clean.offline.scores.items():
        want = summarize(actual, allocated)
        assert want["n"] == 3 * (INTERVALS - WARMUP)
        for key in SUMMARY_KEYS:
            if key == "efficiency_median":  # a running sum has no median; the summary leaves it NaN
                continue
            assert live[name][key] == pytest.approx(want[key], abs=1e-6), (name, key)


@pytest.mark.timeout(120)
def test_kcat_reads_the_same_commands(kafka, clean):
    """kcat (librdkafka, as any operator's client) reads every command, keyed by its site."""
    got = kcat_read(kafka.bootstrap, clean.fleet.topics.commands)
    mine = sorted((r.key.decode(), r.value.decode()) for r in clean.commands)
    assert sorted(got) == mine and len(got) == 3 * INTERVALS
    for key, text in got:
        c = json.loads(text)
        assert c["site"] == key and c["schema"] == "dtwin.allocation-command/1"


def laced_stream(real_site) -> list[tuple[Record, str | None]]:
    """Good samples of two sites with one bad record of every kind after every few of them."""
    good = sample_records([s.slice(0, 200) for s in replay_sites(2, bases=[real_site])], PARTITIONS)
    site = json.loads(good[0].value)["site"]
    key = site.encode()
    ts0 = json.loads(good[0].value)["ts"]

    def body(**changes) -> bytes:
        b = {"site": site, "ts": ts0, "internet": 1.0, "sessions": 1.0, "vpn": 1.0, "downstream": 1.0, **changes}
        return json.dumps({k: v for k, v in b.items() if v is not None}).encode()

    plain = body()
    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (key, None, "tombstone"),
        (key, plain[:-1] + b" " * MAX_SAMPLE_BYTES + b"}", "payload_too_large"),
        (key, b'{"site": "' + key + b'", "ts": ', "malformed_json"),
        (key, b"\x00\xff\xfe garbage", "malformed_json"),
        (key, b"[1, 2, 3]", "not_an_object"),
        (key, body(vpn=None), "missing_field"),
        (key, body(colour="red"), "unknown_field"),
        (key, body(schema="dtwin.kpi-sample/9"), "unsupported_schema"),
        (key, body(internet="300"), "wrong_type"),
        (key, plain.replace(b'"internet": 1.0', b'"internet": NaN'), "not_finite"),
        (key, body(internet=-5.0), "negative_value"),
        (key, body(internet=1e308), "out_of_range"),
        (key, body(ts=TS_MAX + 1), "bad_timestamp"),
        (None, plain, "missing_key"),
        (b"\xff\xfe", plain, "bad_key"),
        (b"another-site", plain, "key_mismatch"),
    ]
    out: list[tuple[Record, str | None]] = []
    last: dict[str, int] = {}
    for k, r in enumerate(good):
        out.append((r, None))
        s = json.loads(r.value)
        last[s["site"]] = s["ts"]
        if k % 7 == 3:
            bkey, bval, reason = bad[(k // 7) % len(bad)]
            out.append((Record(bkey, bval), reason))
        if s["site"] == site and k % 50 == 24:  # relative to the site's last sample: the engine's rejects
            part = site_partition(key, PARTITIONS)
            t = last[site]
            for ts, reason in ((t, "duplicate"), (t - 3 * STEP, "out_of_order"), (t + 7, "misaligned"),
                               (t + 5000 * STEP, "too_far_ahead")):
                out.append((Record(key, encode_sample(site, ts, (1.0, 1.0, 1.0, 1.0)), part), reason))
    return out


@pytest.mark.timeout(300)
def test_bad_input_is_dead_lettered_with_its_reason_and_good_samples_are_processed(kafka, fleets, artifact_dir,
                                                                                  real_site, record_property):
    fleet = fleets["bad"]
    stream = laced_stream(real_site)
    sender = PacedSender(make_producer(kafka.bootstrap), fleet.topics.samples, [r for r, _ in stream])
    sender.start()
    sender.join()
    sender.producer.close()
    assert not sender.errors and len(sender.acks) == len(stream)
    w = fleet.workers["w1"]
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 120, w.alive)
    dead = {(d["source"]["partition"], d["source"]["offset"]): d
            for d in (json.loads(r.value) for r in read_to_end(kafka.bootstrap, fleet.topics.dead_letter))}
    wrong = []
    for i, (rec, reason) in enumerate(stream):
        a = sender.acks[i]
        got = dead.get((a.partition, a.offset))
        if (got["reason"] if got else None) != reason:
            wrong.append((reason, got and got["reason"], rec.value[:80] if rec.value else None))
    n_bad = sum(1 for _, reason in stream if reason)
    good = [r for r, reason in stream if reason is None]
    result = audit(read_to_end(kafka.bootstrap, fleet.topics.commands),
                   run_offline(offline_engine(artifact_dir, WARMUP), good_samples(good)).decisions)
    reasons = sorted({reason for _, reason in stream if reason})
    m = w.metrics()
    report(record_property, "loop_bad_input", {"records": len(stream), "bad": n_bad, "reasons": len(reasons),
                                                **result.figures()})
    assert not wrong, wrong[:5]
    assert len(dead) == n_bad and set(reasons) == set(REJECT_REASONS)
    for reason in reasons:
        assert value(m, "dtwin_samples_rejected_total", reason=reason) == sum(1 for _, r in stream if r == reason)
    assert not result.problems() and result.duplicates == 0, result.problems()
    assert w.alive()


@pytest.mark.timeout(400)
def test_smoke_on_the_embedded_broker(broker, artifact_dir, real_site, tmp_path: Path):
    """Tansu, the zero-dependency default of `make up`, with its changelog markers: one command per sample."""
    fleet = Fleet(broker.bootstrap, "tansu-smoke.", "tansu-smoke", 2, artifact_dir, tmp_path,
                  {"DTWIN_CHANGELOG_MARKERS": "1", "DTWIN_BASELINE_WARMUP_INTERVALS": str(WARMUP)})
    try:
        w = fleet.start("w1")
        sites = [s.slice(0, 60) for s in replay_sites(2, bases=[real_site])]
        producer = make_producer(broker.bootstrap)
        stats = replay(producer, fleet.topics.samples, sites, progress=False)
        producer.close()
        wait_until(lambda: value(w.metrics() or {}, "dtwin_samples_received_total") >= stats.acked, WAIT, 0.5,
                   "the worker to process the replay", w.alive)
    finally:
        fleet.close()
    # Tansu's end offsets fall short of a batch (see README), so read until the expected count.
    commands = [json.loads(r.value) for r in read_topic(broker.bootstrap, fleet.topics.commands, stats.acked)]
    keys = [(c["site"], c["ts"]) for c in commands]
    expected = {(json.loads(r.value)["site"], json.loads(r.value)["ts"] + STEP)
                for r in sample_records(sites, 2)}
    assert len(keys) == len(set(keys)) == stats.acked == 120
    assert set(keys) == expected
