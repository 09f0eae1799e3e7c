"""No decision lost under any single failure, on Apache Kafka (issue 8's scenarios).

Each scenario counts every (site, interval) on the commands topic and compares every command with the
offline engine over the same samples (dtwin.commands.recovery.audit); each prints its figures (``-s``)
and records them in the JUnit XML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from dtwin.commands.recovery import (
    Fleet,
    PacedSender,
    audit,
    finish_kill,
    good_samples,
    offline_engine,
    read_to_end,
    run_offline,
    sample_records,
    site_partition,
    wait_drained,
)
from dtwin.runner import value
from replay.producer import make_producer
from replay.sites import replay_sites
from tests.faults_util import (
    WARMUP,
    check_laid,
    engine_cases,
    hypothesis_pool,
    lay_out,
    report,
    templates,
)

pytestmark = pytest.mark.kafka
FAULT_BATCH = 6  # the faulty worker's batch to die in: a few batches' states are stored before it


@pytest.fixture
def fleets(tmp_path: Path):
    """Fleet factory; every worker is stopped at the end and the logs' places printed."""
    made: list[Fleet] = []

    def make(bootstrap: str, name: str, partitions: int, model_dir: Path, env: dict | None = None,
             create: bool = True) -> Fleet:
        app = f"{name}-{uuid.uuid4().hex[:6]}"  # the session broker is shared, and a rerun must not reuse a group
        fleet = Fleet(bootstrap, f"{app}.", app, partitions, model_dir, tmp_path / "runs",
                      {"DTWIN_BASELINE_WARMUP_INTERVALS": str(WARMUP), **(env or {})}, create=create)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()
        for w in [*fleet.workers.values(), *fleet.retired]:
            print(f"worker log: {w.log_path} (exit code {w.process.returncode})")


def sites_of(real_site, n: int, steps: int):
    return [s.slice(0, steps) for s in replay_sites(n, bases=[real_site])]


def send_all(bootstrap: str, topic: str, records, rate: float | None = None, **producer_options) -> PacedSender:
    sender = PacedSender(make_producer(bootstrap, **producer_options), topic, records, rate)
    sender.start()
    return sender


def finish_sending(sender: PacedSender) -> None:
    sender.join()
    sender.producer.close()
    assert not sender.errors, f"{len(sender.errors)} samples not acknowledged: {next(iter(sender.errors.values()))}"
    assert len(sender.acks) == len(sender.records)


def log_text(w) -> str:
    return Path(w.log_path).read_text(encoding="utf-8", errors="replace")


@pytest.mark.timeout(180)
def test_crash_and_takeover(kafka, artifact_dir, real_site, fleets, record_property):
    """kill -9 one of two workers mid-stream: the survivor takes its partitions, restores the windows and
    headroom from the changelog, and every (site, interval) gets the offline engine's command."""
    partitions = 8
    sites = sites_of(real_site, 24, 400)
    records = sample_records(sites, partitions)
    fleet = fleets(kafka.bootstrap, "takeover", partitions, artifact_dir)
    fleet.start("w1")
    fleet.start("w2")
    fleet.wait_assigned({"w1": 4, "w2": 4})
    sender = send_all(kafka.bootstrap, fleet.topics.samples, records, rate=300)
    time.sleep(10)
    kill = fleet.kill("w1", "w2")
    finish_sending(sender)
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 120, fleet.workers["w2"].alive)
    survivor = fleet.workers["w2"].metrics()
    commands = read_to_end(kafka.bootstrap, fleet.topics.commands)
    offline = run_offline(offline_engine(artifact_dir, WARMUP), good_samples(records))
    result = audit(commands, offline.decisions)
    parts = {s.name: site_partition(s.name.encode(), partitions) for s in sites}
    finish_kill(kill, commands, parts)
    moved = {s for s, p in parts.items() if p in kill.moved_partitions}
    first_after: dict[str, dict] = {}
    for r in sorted(commands, key=lambda r: r.timestamp):
        c = json.loads(r.value)
        if c["site"] in moved and r.timestamp / 1000 > kill.at:
            first_after.setdefault(c["site"], c)
    report(record_property, "crash_and_takeover", {
        **result.figures(), **kill.figures(), "samples": len(records), "sites": len(sites), "moved_sites": len(moved),
        "redelivered": value(survivor, "dtwin_samples_redelivered_total"),
        "reemitted_metric": value(survivor, "dtwin_commands_reemitted_total"),
        "first_after_policies": dict(Counter(c["policy"] for c in first_after.values()))})

    assert len(kill.moved_partitions) == partitions // 2 and moved
    assert not result.problems(), result.problems()
    assert result.commands == len(records) + result.duplicates
    assert result.duplicates == result.reemitted + result.recomputed
    # Every duplicate answers a redelivered sample: re-sent from state (counted by the survivor), or decided
    # again on the same state when the kill fell between its delivery and its state (moved sites only).
    # The survivor's own sites are redelivered too: the rebalance revokes them before their last commit.
    assert result.reemitted == value(survivor, "dtwin_commands_reemitted_total")
    assert value(survivor, "dtwin_samples_redelivered_total") >= result.reemitted
    assert {site for site, _ in result.recomputed_keys} <= moved
    # The first decision for each moved site after the takeover is the model's on a restored window (a lost
    # window would give a fallback) and equals the offline decision (checked above for every command).
    assert set(first_after) == moved
    assert {c["policy"] for c in first_after.values()} == {"ai_sla"}
    assert kill.recovery_s <= 30, kill.figures()
    assert value(survivor, "dtwin_fetch_skips_total") == 0


@pytest.mark.timeout(150)
@pytest.mark.parametrize("step", ["after_commands", "after_state", "mid_send"])
def test_kill_inside_the_batch_cycle(step, kafka, artifact_dir, real_site, fleets, record_property):
    """A worker dies at a step of its batch cycle; a plain worker takes over: nothing lost, duplicates
    identical in allocation (re-sent from state, or decided again on the same state)."""
    sites = sites_of(real_site, 3, 300)
    records = sample_records(sites, 2)
    fleet = fleets(kafka.bootstrap, f"cycle-{step.replace('_', '-')}", 2, artifact_dir, {"DTWIN_BATCH_SIZE": "50"})
    finish_sending(send_all(kafka.bootstrap, fleet.topics.samples, records))
    faulty = fleet.start("faulty", DTWIN_FAULT_POINT=f"{step}:{FAULT_BATCH}")
    assert faulty.process.wait(timeout=90) == 99, log_text(faulty)[-2000:]
    assert f"fault injection: exiting at {step} of batch {FAULT_BATCH}" in log_text(faulty)
    t = time.time()
    plain = fleet.start("plain")
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 120, plain.alive)
    commands = read_to_end(kafka.bootstrap, fleet.topics.commands)
    result = audit(commands, run_offline(offline_engine(artifact_dir, WARMUP), good_samples(records)).decisions)
    m = plain.metrics()
    report(record_property, f"kill_{step}", {**result.figures(), "samples": len(records),
                                              "restart_to_drained_s": round(time.time() - t, 1),
                                              "redelivered": value(m, "dtwin_samples_redelivered_total")})
    assert not result.problems(), result.problems()
    assert result.duplicates == result.reemitted + result.recomputed
    if step == "after_commands":  # the batch's commands were acknowledged, its state never stored
        assert result.recomputed >= 1
    if step == "after_state":  # stored but not committed: redelivered, and re-sent from state
        assert result.reemitted >= 1


@pytest.mark.timeout(150)
def test_graceful_restart(kafka, artifact_dir, real_site, fleets, record_property):
    """SIGTERM mid-stream, then a new worker: no duplicates, no gaps, nothing skipped."""
    sites = sites_of(real_site, 8, 400)
    records = sample_records(sites, 4)
    fleet = fleets(kafka.bootstrap, "graceful", 4, artifact_dir)
    fleet.start("w1")
    fleet.wait_assigned({"w1": 4})
    sender = send_all(kafka.bootstrap, fleet.topics.samples, records, rate=200)
    time.sleep(6)
    t = time.time()
    first = fleet.workers["w1"]
    first.stop()
    stop_s = time.time() - t
    second = fleet.start("w1")
    fleet.wait_assigned({"w1": 4})
    finish_sending(sender)
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 120, second.alive)
    m = second.metrics()
    commands = read_to_end(kafka.bootstrap, fleet.topics.commands)
    result = audit(commands, run_offline(offline_engine(artifact_dir, WARMUP), good_samples(records)).decisions)
    resumed = min((r.timestamp / 1000 for r in commands if r.timestamp / 1000 > t + stop_s), default=float("nan"))
    report(record_property, "graceful_restart", {
        **result.figures(), "samples": len(records), "first_exit_code": first.process.returncode,
        "stop_s": round(stop_s, 2), "sigterm_to_next_command_s": round(resumed - t, 2),
        "redelivered": value(m, "dtwin_samples_redelivered_total"), "gaps": value(m, "dtwin_window_gaps_total")})
    assert first.process.returncode == 0, log_text(first)[-2000:]
    assert not result.problems(), result.problems()
    assert result.duplicates == 0
    assert value(m, "dtwin_window_gaps_total") == 0
    assert value(m, "dtwin_samples_redelivered_total") == 0
    assert value(m, "dtwin_fetch_skips_total") == 0


@pytest.mark.timeout(200)
def test_broker_restart(kafka_fresh, artifact_dir, real_site, fleets, record_property):
    """Kafka stopped and started again on its data folder during a replay: the replay producer and both
    workers reconnect without a crash, and every acknowledged sample gets its command."""
    sites = sites_of(real_site, 8, 500)
    records = sample_records(sites, 4)
    fleet = fleets(kafka_fresh.bootstrap, "broker-restart", 4, artifact_dir)
    fleet.start("w1")
    fleet.start("w2")
    fleet.wait_assigned({"w1": 2, "w2": 2})
    sender = send_all(kafka_fresh.bootstrap, fleet.topics.samples, records, rate=200)
    time.sleep(6)
    t_down = time.time()
    kafka_fresh.stop()
    down_s = time.time() - t_down
    time.sleep(2)
    kafka_fresh.start()
    outage_s = time.time() - t_down
    before = sender.acked_before(t_down)
    finish_sending(sender)
    workers = list(fleet.workers.values())
    wait_drained(kafka_fresh.bootstrap, fleet.app_id, fleet.topics.samples, 150,
                 lambda: all(w.alive() for w in workers))
    logged = read_to_end(kafka_fresh.bootstrap, fleet.topics.samples)
    commands = read_to_end(kafka_fresh.bootstrap, fleet.topics.commands)
    result = audit(commands, run_offline(offline_engine(artifact_dir, WARMUP), good_samples(records)).decisions)
    wanted = {(s.site, s.ts + 300) for s in good_samples([records[i] for i in before])}
    in_log = Counter(r.value for r in logged)
    report(record_property, "broker_restart", {
        **result.figures(), "samples": len(records), "acked_before_outage": len(before),
        "broker_stop_s": round(down_s, 1), "outage_s": round(outage_s, 1),
        "samples_logged_twice": sum(1 for n in in_log.values() if n > 1),
        "workers_alive": [w.alive() for w in workers],
        "rebalances": [value(w.metrics() or {}, "dtwin_rebalances_total") for w in workers]})
    assert all(w.alive() and w.process.returncode is None for w in workers)
    assert 0 < len(before) < len(records)
    assert not wanted & set(result.missing), "samples acknowledged before the outage lost their command"
    assert not result.problems(), result.problems()
    # The idempotent producer wrote each sample once, outage or not.
    assert len(logged) == len(records) and max(in_log.values()) == 1


@pytest.mark.timeout(240)
def test_fuzzed_input(kafka, artifact_dir, real_site, fleets, record_property):
    """Hypothesis-built malformed and edge-case records (binary garbage, 2 MB payloads, tombstones,
    NaN/Infinity, 1e308, huge/negative/far-future ts, empty/mismatched/non-UTF-8/missing keys, wrong types,
    unknown fields...) among good samples: no crash, each bad record dead-lettered with its reason (by source
    offset), each good sample decided as offline."""
    from kafka.admin import KafkaAdminClient, NewTopic

    partitions, n_bad, big = 4, 5200, 3
    pool = hypothesis_pool(templates(), 2500)
    cases = hypothesis_pool(engine_cases, 400)
    base = sites_of(real_site, 3, 300)
    sites = [*base, dataclasses.replace(base[0], name="site-ü-站")]
    laid = lay_out(sample_records(sites, partitions), pool, cases, n_bad, big, partitions)
    check_laid(laid)
    fleet = fleets(kafka.bootstrap, "fuzz", partitions, artifact_dir, create=False)
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:  # room for the 2 MB records; the dead letters are cut to 64 KiB and fit the default limit
        admin.create_topics([NewTopic(fleet.topics.samples, partitions, 1,
                                      topic_configs={"max.message.bytes": str(3 * 1024 * 1024)})])
    finally:
        admin.close()
    from dtwin.topics import create_topics

    create_topics(kafka.bootstrap, fleet.topics, partitions, fleet.app_id)
    w = fleet.start("w1")
    fleet.wait_assigned({"w1": partitions})
    sender = send_all(kafka.bootstrap, fleet.topics.samples, [x.record for x in laid],
                      max_request_size=4 * 1024 * 1024)
    finish_sending(sender)
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 150, w.alive)
    m = w.metrics()
    dead = [json.loads(r.value) for r in read_to_end(kafka.bootstrap, fleet.topics.dead_letter)]
    by_source = Counter((d["source"]["partition"], d["source"]["offset"]) for d in dead)
    reason_at = {(d["source"]["partition"], d["source"]["offset"]): d for d in dead}
    wrong, missing, extra = [], [], []
    for i, x in enumerate(laid):
        a = sender.acks[i]
        pos = (a.partition, a.offset)
        if x.reason is None:
            if pos in reason_at:
                extra.append((x.kind, reason_at[pos]["reason"], reason_at[pos]["detail"]))
        elif pos not in reason_at:
            missing.append((x.kind, x.reason))
        elif reason_at[pos]["reason"] != x.reason:
            wrong.append((x.kind, x.reason, reason_at[pos]["reason"], reason_at[pos]["detail"][:120]))
    good = [x.record for x in laid if x.reason is None]
    result = audit(read_to_end(kafka.bootstrap, fleet.topics.commands),
                   run_offline(offline_engine(artifact_dir, WARMUP), good_samples(good)).decisions)
    big_letters = [d for d in dead if d["payload_bytes"] >= 2 * 1024 * 1024]
    big_sent = {hashlib.sha256(x.record.value).hexdigest() for x in laid if x.kind == "2MB"}
    reasons = Counter(x.reason for x in laid if x.reason)
    report(record_property, "fuzzing", {
        "records": len(laid), "bad": sum(reasons.values()), "good": len(good),
        "edge_case_good": sum(1 for x in laid if x.reason is None and x.kind != "good"),
        "kinds": len({x.kind for x in laid}), "by_reason": dict(sorted(reasons.items())),
        "dead_letters": len(dead), "worker_alive": w.alive(), **result.figures()})
    assert w.alive(), f"worker exited with {w.process.returncode}: {log_text(w)[-2000:]}"
    assert "failed; stopping the worker" not in log_text(w), log_text(w)[-2000:]
    assert not missing and not wrong and not extra, (missing[:5], wrong[:5], extra[:5])
    assert max(by_source.values()) == 1 and len(dead) == sum(reasons.values()) >= 5000
    assert sum(m["dtwin_samples_rejected_total"].values()) == len(dead)
    assert value(m, "dtwin_samples_received_total") == len(laid)
    assert not result.problems() and result.duplicates == 0, result.problems()
    assert {d["payload_sha256"] for d in big_letters} == big_sent
    assert all(d["payload_truncated"] and d["reason"] == "payload_too_large" for d in big_letters)
    assert {d["reason"] for d in dead if d["tombstone"]} == {"tombstone"}


@pytest.mark.timeout(150)
def test_poison_state(kafka, artifact_dir, real_site, fleets, record_property):
    """A corrupt changelog value for one site: after a restart that site alone starts afresh (counted, logged)
    and keeps getting commands; every other site's commands equal the offline engine's."""
    from kafka import KafkaProducer

    partitions, half = 2, 150
    sites = sites_of(real_site, 4, 2 * half)
    first, second = sample_records(sites, partitions, 0, half), sample_records(sites, partitions, half)
    fleet = fleets(kafka.bootstrap, "poison", partitions, artifact_dir)
    finish_sending(send_all(kafka.bootstrap, fleet.topics.samples, first))
    w = fleet.start("w1")
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 90, w.alive)
    w.stop()
    victim = sites[0].name
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    producer.send(fleet.topics.changelog(fleet.app_id), key=victim.encode(), value=b"\x02\xffnot a site state\x00",
                  partition=site_partition(victim.encode(), partitions)).get(timeout=30)
    producer.close()
    finish_sending(send_all(kafka.bootstrap, fleet.topics.samples, second))
    w = fleet.start("w1")
    wait_drained(kafka.bootstrap, fleet.app_id, fleet.topics.samples, 90, w.alive)
    m = w.metrics()
    engine = offline_engine(artifact_dir, WARMUP)
    expected = dict(run_offline(engine, good_samples(first + second)).decisions)
    fresh = run_offline(engine, [s for s in good_samples(second) if s.site == victim]).decisions
    expected.update(fresh)  # the victim's second half: decided from scratch (fallback until its window refills)
    result = audit(read_to_end(kafka.bootstrap, fleet.topics.commands), expected)
    victim_policies = Counter(c.policy for c in fresh.values())
    report(record_property, "poison_state", {**result.figures(), "resets": value(m, "dtwin_state_resets_total",
                                                                                reason="corrupt"),
                                             "victim_second_half": dict(victim_policies)})
    assert value(m, "dtwin_state_resets_total", reason="corrupt") >= 1
    assert f"site {victim!r}: stored state does not decode" in log_text(w)
    assert w.alive(), f"worker exited with {w.process.returncode}: {log_text(w)[-2000:]}"
    assert "failed; stopping the worker" not in log_text(w), log_text(w)[-2000:]
    assert victim_policies["fallback"] == 9 and victim_policies["ai_sla"] == half - 9
    assert not result.problems(), result.problems()
    assert result.duplicates == 0
    assert value(m, "dtwin_fetch_skips_total") == 0
