"""The closed loop on a real Kafka-protocol broker (the embedded Tansu), with real data.

Two controllers run side by side (their first group joins overlap): one gets clean replayed
traffic from two sites derived from the real dataset, the other a stream laced with bad input.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from contracts.messages import encode_sample
from contracts.topics import Topics
from controller.policy import allocators_from_manifest
from dtwin.runner import ControllerProcess, scrape, start_controller, value, wait_until
from dtwin.topics import create_topics
from export.artifact import load_artifact
from forecaster.core.metrics import summarize
from forecaster.core.windows import make_windows
from replay.producer import DEFAULT_BASE_TS, make_producer, replay
from replay.sites import replay_sites
from tests.kafka_util import WAIT, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

INTERVALS = 1100  # per site: 2 sites x 1100 = 2,200 real samples
STEP = 300


@pytest.fixture(scope="module")
def controllers(broker, artifact_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    started: dict[str, ControllerProcess] = {}
    for name in ("clean", "bad"):
        topics = Topics(f"it-{name}.")
        create_topics(broker.bootstrap, topics, partitions=2, app_id=f"it-{name}")
        started[name] = start_controller(broker.bootstrap, artifact_dir, run_dir, topics.prefix, f"it-{name}", 2,
                                         log_name=f"{name}.log")
    yield started
    for c in started.values():
        c.stop()


def wait_for_samples(ctl: ControllerProcess, n: int) -> dict:
    wait_until(lambda: value(ctl.metrics() or {}, "dtwin_samples_received_total") >= n, WAIT, 0.5,
               f"{n} samples at the controller", ctl.alive)
    time.sleep(1.0)  # the last batch's gauges are set after its commands are delivered
    return scrape(ctl.metrics_port)


def test_every_interval_gets_exactly_one_command_and_live_metrics_equal_offline(broker, controllers, artifact_dir,
                                                                                real_site):
    sites = [s.slice(0, INTERVALS) for s in replay_sites(2, bases=[real_site])]
    topics = Topics("it-clean.")
    producer = make_producer(broker.bootstrap)
    stats = replay(producer, topics.samples, sites, progress=False)
    producer.close()
    assert stats.acked == 2 * INTERVALS >= 2000 and stats.failed == 0

    metrics = wait_for_samples(controllers["clean"], stats.acked)
    n_decisions = 2 * (INTERVALS - 9)
    records = read_topic(broker.bootstrap, topics.commands, n_decisions)
    commands = [json.loads(r.value) for r in records]
    keys = [(c["site"], c["ts"]) for c in commands]
    expected = {(s.name, DEFAULT_BASE_TS + int(s.timestamps[i]) + STEP) for s in sites for i in range(9, INTERVALS)}
    assert len(keys) == len(set(keys)), "duplicate commands"
    assert set(keys) == expected, f"missing {len(expected - set(keys))}, unexpected {len(set(keys) - expected)}"
    assert value(metrics, "dtwin_commands_sent_total") == n_decisions
    assert all(r.key == c["site"].encode() for r, c in zip(records, commands, strict=True))

    # Offline: the same artifact and allocators on the same windows, scored with the shared metric code.
    art = load_artifact(artifact_dir)
    live, shadows = allocators_from_manifest(art.manifest)
    by_key = {(c["site"], c["ts"]): c for c in commands}
    actual_all, live_sent, offline = [], [], {a.name: [] for a in [live, *shadows]}
    for s in sites:
        x, y = make_windows(s.values, 10)  # window i predicts row i+10
        forecast = art.predict(x)
        last = x[:, -1, 0]
        sent = [by_key[(s.name, DEFAULT_BASE_TS + int(s.timestamps[i + 10]))] for i in range(len(y))]
        np.testing.assert_allclose([c["forecast"] for c in sent], forecast, atol=1e-3)
        for a in [live, *shadows]:
            offline[a.name].append(a.allocate(last, forecast))
        live_sent.append([c["allocated"] for c in sent])
        actual_all.append(y)
    actual = np.concatenate(actual_all)
    live_alloc = np.concatenate(live_sent)
    np.testing.assert_allclose(live_alloc, np.concatenate(offline[live.name]), atol=1e-3)

    for name in offline:
        allocated = live_alloc if name == live.name else np.concatenate(offline[name])
        want = summarize(actual, allocated)
        got = {k: value(metrics, m, allocator=name) for k, m in [
            ("efficiency_mean", "dtwin_allocation_efficiency_mean_ratio"),
            ("wastage_mean", "dtwin_allocation_wastage_mean_ratio"),
            ("utilization_mean", "dtwin_allocation_utilization_mean_ratio"),
            ("overprovisioning_mean", "dtwin_allocation_overprovisioning_mean_units"),
            ("underprovisioning_rate", "dtwin_allocation_underprovisioning_ratio")]}
        assert value(metrics, "dtwin_allocation_intervals_scored_total", allocator=name) == want["n"] == len(actual)
        for key, live_value in got.items():
            assert live_value == pytest.approx(want[key], abs=1e-6), (name, key)
        assert value(metrics, "dtwin_allocation_underprovisioned_total", allocator=name) == round(
            want["underprovisioning_rate"] * want["n"])
    assert value(metrics, "dtwin_samples_rejected_total", reason="duplicate") == 0


def good(site: str, ts: int, level: float) -> bytes:
    return encode_sample(site, ts, (level, level / 2, level / 3, level * 0.9))


def test_bad_input_is_dead_lettered_with_its_reason_and_good_samples_around_it_are_processed(broker, controllers,
                                                                                            real_site):
    topics = Topics("it-bad.")
    site = "bad-site"
    t0 = DEFAULT_BASE_TS
    values = real_site.values[:40]
    bad = {
        "malformed_json": b'{"site": "bad-site", "ts": ',
        "missing_field": json.dumps({"site": site, "ts": t0, "internet": 1.0, "sessions": 1.0, "vpn": 1.0}).encode(),
        "not_finite": (f'{{"site":"{site}","ts":{t0},"internet":NaN,"sessions":1,"vpn":1,"downstream":1}}').encode(),
        "negative_value": json.dumps({"site": site, "ts": t0, "internet": -5.0, "sessions": 1, "vpn": 1,
                                      "downstream": 1}).encode(),
        "wrong_type": json.dumps({"site": site, "ts": t0, "internet": "300", "sessions": 1, "vpn": 1,
                                  "downstream": 1}).encode(),
        "unknown_field": json.dumps({"site": site, "ts": t0, "internet": 1, "sessions": 1, "vpn": 1,
                                     "downstream": 1, "colour": "red"}).encode(),
    }
    messages: list[tuple[bytes, str | None]] = []
    bad_iter = iter(bad.items())
    for i in range(40):
        ts = t0 + STEP * i
        messages.append((encode_sample(site, ts, values[i]), None))
        if i % 5 == 2:
            reason, payload = next(bad_iter, (None, None))
            if reason:
                messages.append((payload, reason))
        if i == 20:
            messages.append((encode_sample(site, ts, values[i]), "duplicate"))
        if i == 25:
            messages.append((encode_sample(site, ts - 3 * STEP, values[i - 3]), "out_of_order"))
    expected_reasons = [r for _, r in messages if r]
    assert sorted(expected_reasons) == sorted([*bad, "duplicate", "out_of_order"])

    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for payload, _ in messages:
        producer.send(topics.samples, key=site.encode(), value=payload)
    producer.flush()
    producer.close()

    metrics = wait_for_samples(controllers["bad"], len(messages))
    for reason in expected_reasons:
        assert value(metrics, "dtwin_samples_rejected_total", reason=reason) == 1, reason

    dead = [json.loads(r.value) for r in read_topic(broker.bootstrap, topics.dead_letter, len(expected_reasons))]
    assert sorted(d["reason"] for d in dead) == sorted(expected_reasons)
    sent_bad = {r: p for p, r in messages if r}
    for d in dead:
        assert d["payload"].encode() == sent_bad[d["reason"]], d["reason"]
        assert d["source"]["topic"] == topics.samples and d["source"]["offset"] >= 0 and d["detail"]

    commands = [json.loads(r.value) for r in read_topic(broker.bootstrap, topics.commands, 31)]
    assert sorted(c["ts"] for c in commands) == [t0 + STEP * (i + 1) for i in range(9, 40)]
    assert value(metrics, "dtwin_allocation_intervals_scored_total", allocator="ai_sla") == 30
