"""``dtwin bench recovery``: takeover after ``kill -9`` and table recovery on Apache Kafka, and the kit the
fault tests share with it (tests/test_faults.py): paced sending with per-record acks, reading a topic to its
end, the group's assignment, the offline engine over the same samples, and the audit of the commands topic
(one command per (site, interval), duplicates identical, every command equal to the offline decision)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.messages import Sample, parse_sample
from contracts.topics import Topics
from dtwin.args import add_data_args
from dtwin.runner import ControllerProcess, default_model_dir, ensure_model, start_controller, value, wait_until
from replay.producer import DEFAULT_BASE_TS, site_partition

# Apache Kafka needs no changelog markers (they work around Tansu's end offsets).
KAFKA_WORKER_ENV = {"DTWIN_CHANGELOG_MARKERS": "0"}
OFFLINE_TOLERANCE = 1e-9


# --- records and sending -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes | None
    partition: int | None = None  # None: the producer's partitioner


def sample_records(sites: Sequence, partitions: int, start: int = 0, stop: int | None = None,
                   base_ts: int = DEFAULT_BASE_TS) -> list[Record]:
    """Samples interval by interval, all sites per interval, keyed by site, with replay's timestamps."""
    from contracts.messages import encode_sample

    stop = min(len(s.values) for s in sites) if stop is None else stop
    step = sites[0].step_seconds
    t0 = base_ts + int(sites[0].timestamps[0])
    keys = [s.name.encode() for s in sites]
    parts = [site_partition(k, partitions) for k in keys]
    return [Record(k, encode_sample(s.name, t0 + step * i, s.values[i]), p)
            for i in range(start, stop) for s, k, p in zip(sites, keys, parts, strict=True)]


@dataclass(frozen=True)
class Ack:
    partition: int
    offset: int
    at: float  # wall clock of the acknowledgement


class PacedSender(threading.Thread):
    """Sends records in order at ``rate`` records/s (None: as fast as possible) from a thread, and keeps each
    record's acknowledgement (partition, offset, time) or its error."""

    def __init__(self, producer, topic: str, records: Sequence[Record], rate: float | None = None) -> None:
        super().__init__(daemon=True, name="paced-sender")
        self.producer, self.topic, self.records, self.rate = producer, topic, records, rate
        self.acks: dict[int, Ack] = {}
        self.errors: dict[int, str] = {}
        self.sent = 0
        self.stop_event = threading.Event()
        self.started_at = 0.0
        self._lock = threading.Lock()

    def _ok(self, i: int, md) -> None:
        with self._lock:
            self.acks[i] = Ack(md.partition, md.offset, time.time())

    def _err(self, i: int, exc) -> None:
        with self._lock:
            self.errors[i] = repr(exc)

    def run(self) -> None:
        self.started_at = t0 = time.perf_counter()
        for i, r in enumerate(self.records):
            if self.stop_event.is_set():
                break
            if self.rate:
                delay = t0 + i / self.rate - time.perf_counter()
                if delay > 0.001:
                    self.stop_event.wait(delay)
            fut = self.producer.send(self.topic, key=r.key, value=r.value, partition=r.partition)
            fut.add_callback(self._ok, i)
            fut.add_errback(self._err, i)
            self.sent += 1
        self.producer.flush()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

    def acked_before(self, t: float) -> list[int]:
        with self._lock:
            return sorted(i for i, a in self.acks.items() if a.at < t)


# --- reading the broker ----------------------------------------------------------------------------------------
def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list:
    """Every record of ``topic`` up to the end offsets seen at the start, by partition (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        parts = [TopicPartition(topic, p) for p in sorted(partitions or [])]
        if not parts:
            raise TimeoutError(f"topic {topic} has no partitions")
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list = []
        while any(consumer.position(p) < ends[p] for p in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: {len(out)} records in {timeout:.0f} s, short of its end")
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend(recs)
        return out
    finally:
        consumer.close()


def _admin(bootstrap: str):
    from kafka.admin import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="dtwin-recovery", request_timeout_ms=10_000)


def group_assignment(bootstrap: str, group: str, topic: str) -> dict[str, set[int]]:
    """member id → the partitions of ``topic`` assigned to it (Faust's assignor writes the standard format)."""
    # kafka-python warns that it cannot decode Faust's subscription metadata (its own JSON); the
    # assignment itself is the standard one.
    quiet = logging.getLogger("kafka.admin")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    admin = _admin(bootstrap)
    try:
        desc = admin.describe_groups([group])[group]
    finally:
        admin.close()
        quiet.setLevel(level)
    out: dict[str, set[int]] = {}
    for m in desc.get("members", []):
        parts: set[int] = set()
        assignment = m.get("member_assignment") or {}
        for t in (assignment.get("assigned_partitions") or assignment.get("assignment") or []):
            name = t.get("topic") if isinstance(t, dict) else t[0]
            plist = t.get("partitions") if isinstance(t, dict) else t[1]
            if name == topic:
                parts |= set(plist)
        out[m["member_id"]] = parts
    return out


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = _admin(bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == topic}


def wait_drained(bootstrap: str, group: str, topic: str, timeout: float,
                 alive: Callable[[], bool] = lambda: True) -> None:
    """Until the group has committed every partition of ``topic`` up to its end (all records processed)."""
    ends = end_offsets(bootstrap, topic)
    got: dict[int, int] = {}

    def done() -> bool:
        nonlocal got
        try:
            got = committed_offsets(bootstrap, group, topic)
        except Exception:  # the coordinator moves or restarts: ask again
            return False
        return all(got.get(p, -1) >= end for p, end in ends.items() if end > 0)

    try:
        wait_until(done, timeout, 0.5, f"group {group} to commit {topic} to its end", alive)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: committed {dict(sorted(got.items()))}, end offsets {dict(sorted(ends.items()))}") \
            from None


# --- the offline twin ----------------------------------------------------------------------------------------
def offline_engine(model_dir: Path, warmup: int, sla_target: float = 0.01, horizon: int = 2016):
    """The controller's engine with the settings the workers use, outside Kafka."""
    from controller.engine import Engine, EngineSettings
    from controller.serving import persistence_headroom, served_model
    from export.artifact import load_artifact

    art = load_artifact(model_dir)
    return Engine(EngineSettings(window=art.window, step_seconds=int(art.manifest["step_seconds"]),
                                 persistence=persistence_headroom(art.manifest, sla_target), warmup=warmup,
                                 horizon_intervals=horizon),
                  served_model(art, sla_target))


@dataclass
class Offline:
    decisions: dict[tuple[str, int], Any]  # (site, ts) -> controller.engine.Command
    scores: dict[str, tuple[list[float], list[float]]]  # allocator -> (actual, allocated)
    states: dict
    rejects: list[tuple[int, str]]


def run_offline(engine, samples: Sequence[Sample], batch: int = 500, states: Mapping | None = None) -> Offline:
    """The engine over ``samples`` in record order, the states carried through the table's codec."""
    from contracts.state import decode_state, encode_state

    out = Offline({}, {}, dict(states or {}), [])
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        res = engine.process(out.states, chunk, [(0, i + j) for j in range(len(chunk))], 0.0)
        out.states.update({k: decode_state(encode_state(v)) for k, v in res.states.items()})
        for c in res.commands:
            out.decisions[(c.site, c.ts)] = c
        out.rejects += [(i + j, reason) for j, reason, _ in res.rejects]
        for name, sc in res.scores.items():
            actual, allocated = out.scores.setdefault(name, ([], []))
            actual += sc.actual
            allocated += sc.allocated
    return out


def good_samples(records: Iterable[Record]) -> list[Sample]:
    return [parse_sample(r.value) for r in records]


# --- the audit of the commands topic -----------------------------------------------------------------------------
@dataclass
class Audit:
    expected: int = 0
    commands: int = 0
    missing: list[tuple[str, int]] = field(default_factory=list)
    unexpected: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0  # commands beyond the first for their (site, ts)
    reemitted: int = 0  # duplicates identical to the first, decided_at included (re-sent from state)
    recomputed: int = 0  # same allocation, forecast, policy and model, a new decided_at (decided again)
    differing: list[tuple[str, int]] = field(default_factory=list)  # duplicates that disagree: never allowed
    mismatched: list[tuple[str, int, str]] = field(default_factory=list)  # differs from the offline engine
    bad_keys: int = 0
    duplicated_keys: set[tuple[str, int]] = field(default_factory=set)
    recomputed_keys: set[tuple[str, int]] = field(default_factory=set)

    @property
    def lost(self) -> int:
        return len(self.missing)

    @property
    def identical(self) -> bool:
        return not self.differing

    def figures(self) -> dict:
        return {"expected": self.expected, "commands": self.commands, "lost": self.lost,
                "unexpected": len(self.unexpected), "duplicates": self.duplicates, "reemitted": self.reemitted,
                "recomputed": self.recomputed, "duplicates_identical": self.identical,
                "mismatched": len(self.mismatched), "mismatched_examples": [list(m) for m in self.mismatched[:20]],
                "bad_keys": self.bad_keys}

    def problems(self) -> str:
        """Empty when every expected interval has exactly the offline command and duplicates are identical."""
        out = []
        if self.missing:
            out.append(f"{self.lost} lost, e.g. {self.missing[:5]}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected, e.g. {self.unexpected[:5]}")
        if self.differing:
            out.append(f"{len(self.differing)} duplicates that differ, e.g. {self.differing[:5]}")
        if self.mismatched:
            out.append(f"{len(self.mismatched)} differ from the offline engine, e.g. {self.mismatched[:3]}")
        if self.bad_keys:
            out.append(f"{self.bad_keys} commands keyed by something else than their site")
        return "; ".join(out)


def _same_decision(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("allocated", "forecast", "policy", "model_version"))


def audit(records: Iterable, expected: Mapping[tuple[str, int], Any] | None,
          keys: Iterable[tuple[str, int]] | None = None) -> Audit:
    """Commands topic records against the offline decisions (or, with ``expected=None``, only ``keys``)."""
    want = set(expected) if expected is not None else set(keys or ())
    first: dict[tuple[str, int], dict] = {}
    a = Audit(expected=len(want))
    for r in records:
        c = json.loads(r.value)
        a.commands += 1
        k = (c["site"], c["ts"])
        if r.key != c["site"].encode():
            a.bad_keys += 1
        if k in first:
            a.duplicates += 1
            a.duplicated_keys.add(k)
            f = first[k]
            if not _same_decision(f, c):
                a.differing.append(k)
            elif f["decided_at"] == c["decided_at"]:
                a.reemitted += 1
            else:
                a.recomputed += 1
                a.recomputed_keys.add(k)
            continue
        first[k] = c
        if k not in want:
            a.unexpected.append(k)
            continue
        if expected is not None:
            o = expected[k]
            if c["policy"] != o.policy or c["model_version"] != o.model_version \
                    or not math.isclose(c["allocated"], o.allocated, rel_tol=0, abs_tol=OFFLINE_TOLERANCE) \
                    or not math.isclose(c["forecast"], o.forecast, rel_tol=0, abs_tol=OFFLINE_TOLERANCE):
                a.mismatched.append((k[0], k[1], f"live {c['policy']} {c['allocated']!r}/{c['forecast']!r}, "
                                                 f"offline {o.policy} {o.allocated!r}/{o.forecast!r}"))
    a.missing = sorted(want - set(first))
    return a


# --- takeover timing -------------------------------------------------------------------------------------------
def site_first_after(records: Iterable, t: float, sites: set[str]) -> dict[str, float]:
    """site → the broker timestamp (s) of its first command record written after wall time ``t``."""
    out: dict[str, float] = {}
    for r in records:
        site = r.key.decode() if r.key else ""
        ts = r.timestamp / 1000.0
        if site in sites and ts > t and (site not in out or ts < out[site]):
            out[site] = ts
    return out


def longest_pause(records: Iterable, sites: set[str], start: float, end: float) -> float:
    """The longest gap between consecutive commands of any of ``sites`` that overlaps [start, end] (s)."""
    by_site: dict[str, list[float]] = {}
    for r in records:
        site = r.key.decode() if r.key else ""
        if site in sites:
            by_site.setdefault(site, []).append(r.timestamp / 1000.0)
    worst = 0.0
    for times in by_site.values():
        times.sort()
        for a, b in itertools.pairwise(times):
            if b > start and a < end:
                worst = max(worst, b - a)
    return worst


@dataclass
class Kill:
    victim: str
    at: float
    moved_partitions: set[int]
    takeover_s: float = math.nan  # kill → the survivor holds every partition (its gauge)
    recovery_s: float = math.nan  # kill → first command for a moved site
    all_moved_s: float = math.nan  # kill → every moved site had a command again
    survivor_pause_s: float = math.nan  # longest pause of the survivor's own sites over the kill

    def figures(self) -> dict:
        return {"victim": self.victim, "moved_partitions": sorted(self.moved_partitions),
                "takeover_s": round(self.takeover_s, 3), "recovery_s": round(self.recovery_s, 3),
                "all_moved_s": round(self.all_moved_s, 3), "survivor_pause_s": round(self.survivor_pause_s, 3)}


def finish_kill(kill: Kill, records: Sequence, site_parts: Mapping[str, int]) -> Kill:
    moved = {s for s, p in site_parts.items() if p in kill.moved_partitions}
    first = site_first_after(records, kill.at, moved)
    if first:
        kill.recovery_s = min(first.values()) - kill.at
    if moved and len(first) == len(moved):
        kill.all_moved_s = max(first.values()) - kill.at
    end = kill.at + max(kill.takeover_s, kill.all_moved_s if math.isfinite(kill.all_moved_s) else 0.0) + 5.0
    kill.survivor_pause_s = longest_pause(records, set(site_parts) - moved, kill.at, end)
    return kill


class Fleet:
    """Workers of one consumer group on one set of topics, each with its own ports and state folder."""

    def __init__(self, bootstrap: str, prefix: str, app_id: str, partitions: int, model_dir: Path, run_dir: Path,
                 env: Mapping[str, str] | None = None, create: bool = True) -> None:
        from dtwin.topics import create_topics

        self.bootstrap, self.app_id, self.partitions = bootstrap, app_id, partitions
        self.topics = Topics(prefix)
        self.model_dir, self.run_dir = model_dir, run_dir
        self.env = {**KAFKA_WORKER_ENV, **(env or {})}
        self.workers: dict[str, ControllerProcess] = {}
        self.retired: list[ControllerProcess] = []
        if create:
            create_topics(bootstrap, self.topics, partitions, app_id)

    def start(self, name: str, **env: str) -> ControllerProcess:
        if name in self.workers:
            self.retired.append(self.workers.pop(name))
        w = start_controller(self.bootstrap, self.model_dir, self.run_dir, self.topics.prefix, self.app_id,
                             self.partitions, extra_env={**self.env, **env}, log_name=f"{self.app_id}-{name}.log",
                             worker=name)
        self.workers[name] = w
        return w

    def assigned(self, name: str) -> float:
        return value(self.workers[name].metrics() or {}, "dtwin_assigned_partitions")

    def wait_assigned(self, counts: Mapping[str, int], timeout: float = 120.0) -> None:
        """Until each named worker holds that many source partitions (a settled rebalance)."""
        def alive() -> bool:
            return all(self.workers[n].alive() for n in counts)

        wait_until(lambda: all(self.assigned(n) == c for n, c in counts.items()), timeout, 0.2,
                   f"assignment {dict(counts)}", alive)

    def metric(self, name: str, metric: str, **labels: str) -> float:
        return value(self.workers[name].metrics() or {}, metric, **labels)

    def close(self) -> None:
        for w in [*self.workers.values(), *self.retired]:
            w.stop()

    def kill(self, victim: str, survivor: str, timeout: float = 120.0) -> Kill:
        """SIGKILL ``victim`` and wait until ``survivor`` holds every partition."""
        before = group_assignment(self.bootstrap, self.app_id, self.topics.samples)
        t = time.time()
        self.workers[victim].kill()
        wait_until(lambda: self.assigned(survivor) == self.partitions, timeout, 0.1,
                   f"{survivor} to take over every partition", self.workers[survivor].alive)
        took = time.time() - t
        after = group_assignment(self.bootstrap, self.app_id, self.topics.samples)
        gone = set(before) - set(after)
        moved = set().union(*(before[m] for m in gone)) if gone else set()
        return Kill(victim, t, moved, takeover_s=took)


# --- the benchmark -------------------------------------------------------------------------------------------
def _sites_for(args: argparse.Namespace, n: int, n_steps: int):
    from forecaster.data import resolve_data_dir
    from replay.sites import replay_sites

    if resolve_data_dir(args.data) is None:
        return replay_sites(n, bases=None, seed=args.synthetic_seed, n_steps=n_steps)
    from dtwin.args import load_site_from_args

    return [s.slice(0, n_steps) for s in replay_sites(n, bases=[load_site_from_args(args)])]


def bench_takeover(args: argparse.Namespace, bootstrap: str, model_dir: Path, run_dir: Path) -> dict:
    from replay.producer import make_producer

    rate = args.rate
    cycle = 2 * args.session_timeout + 25  # kill, takeover, restart, rebalance, settle
    seconds = args.kills * cycle + 20
    n_steps = int(seconds * rate / args.sites) + 1
    sites = _sites_for(args, args.sites, n_steps)
    records = sample_records(sites, args.partitions)
    site_parts = {s.name: site_partition(s.name.encode(), args.partitions) for s in sites}
    env = {"DTWIN_BASELINE_WARMUP_INTERVALS": str(args.warmup),
           "DTWIN_SESSION_TIMEOUT_SECONDS": f"{args.session_timeout:g}"}
    fleet = Fleet(bootstrap, "bench-takeover.", "bench-takeover", args.partitions, model_dir, run_dir, env)
    half = args.partitions // 2
    kills: list[Kill] = []
    try:
        for name in ("w1", "w2"):
            fleet.start(name)
        fleet.wait_assigned({"w1": half, "w2": args.partitions - half})
        print(f"takeover: 2 workers, {args.partitions} partitions, {args.sites} sites, {rate:g} samples/s for up "
              f"to {seconds:.0f} s", flush=True)
        sender = PacedSender(make_producer(bootstrap), fleet.topics.samples, records, rate)
        sender.start()
        time.sleep(8)
        for k in range(args.kills):
            victim, survivor = ("w1", "w2") if k % 2 == 0 else ("w2", "w1")
            kill = fleet.kill(victim, survivor, timeout=4 * args.session_timeout + 60)
            kills.append(kill)
            print(f"kill {k + 1}/{args.kills}: {victim} killed; {survivor} holds all {args.partitions} partitions "
                  f"after {kill.takeover_s:.1f} s", flush=True)
            time.sleep(4)
            fleet.start(victim)
            fleet.wait_assigned({victim: half, survivor: args.partitions - half}, timeout=180)
            time.sleep(4)
        sender.stop()
        sender.producer.close()
        if sender.errors:
            raise RuntimeError(f"{len(sender.errors)} samples were not acknowledged: "
                               f"{next(iter(sender.errors.values()))}")
        sent = [records[i] for i in sorted(sender.acks)]
        print(f"takeover: {len(sent)} samples sent; draining", flush=True)
        wait_drained(bootstrap, fleet.app_id, fleet.topics.samples, 180,
                     lambda: all(w.alive() for w in fleet.workers.values()))
    finally:
        fleet.close()
    commands = read_to_end(bootstrap, fleet.topics.commands)
    offline = run_offline(offline_engine(model_dir, args.warmup), good_samples(sent))
    result = audit(commands, offline.decisions)
    for kill in kills:
        finish_kill(kill, commands, site_parts)
    recovery = [k.recovery_s for k in kills]
    print(f"takeover: {result.figures()}", flush=True)
    return {"kills": len(kills), "lost": result.lost, "duplicates": result.duplicates,
            "duplicates_identical": result.identical,
            "recovery_s": {"median": round(statistics.median(recovery), 3), "max": round(max(recovery), 3)},
            "takeover": {**result.figures(), "samples": len(sent), "sites": args.sites, "rate": rate,
                         "per_kill": [k.figures() for k in kills]}}


def prefill_states(model_dir: Path, warmup: int, n_sites: int, partitions: int, templates: int = 16):
    """``n_sites`` realistic site states (full window, frozen baselines, online headroom, a pending decision),
    made by the offline engine over a few synthetic sites and cloned; keyed ``bench-000000``... Their stored
    offset is -1, so any sample continuing a site is taken as new."""
    from contracts.state import encode_state
    from replay.sites import replay_sites

    sites = replay_sites(templates, bases=None, seed=0, n_steps=warmup + 40)
    samples = [smp for group in zip(*[good_samples(sample_records([s], 1)) for s in sites], strict=True)
               for smp in group]
    states = run_offline(offline_engine(model_dir, warmup), samples).states
    blobs = []
    for s in sites:
        st = states[s.name]
        st.offset = -1
        blobs.append((st, s))
    out = []
    for k in range(n_sites):
        st, _ = blobs[k % len(blobs)]
        key = f"bench-{k:06d}".encode()
        st.partition = site_partition(key, partitions)
        out.append((key, encode_state(st), st.partition))
    probe_state, probe_site = blobs[0]
    return out, probe_state, probe_site


def bench_table_recovery(args: argparse.Namespace, bootstrap: str, model_dir: Path, run_dir: Path,
                         n_sites: int) -> dict:
    """A fresh worker over a changelog pre-filled with ``n_sites`` states: start → table recovered, and start →
    the first command (for a pre-filled site whose sample waits in the topic)."""
    from contracts.messages import encode_sample
    from replay.producer import make_producer

    app_id = f"bench-table-{n_sites}"
    fleet = Fleet(bootstrap, f"{app_id}.", app_id, args.partitions, model_dir, run_dir,
                  {"DTWIN_BASELINE_WARMUP_INTERVALS": str(args.warmup)})
    states, probe_state, probe_site = prefill_states(model_dir, args.warmup, max(n_sites, 1), args.partitions)
    producer = make_producer(bootstrap, max_request_size=4 * 1024 * 1024)
    changelog = fleet.topics.changelog(app_id)
    t = time.perf_counter()
    for key, blob, part in states[:n_sites]:
        producer.send(changelog, key=key, value=blob, partition=part)
    key = b"bench-000000"
    ts = int(probe_state.last_ts) + probe_site.step_seconds
    probe = encode_sample(key.decode(), ts, probe_site.values[len(probe_site.values) - 1])
    producer.send(fleet.topics.samples, key=key, value=probe, partition=site_partition(key, args.partitions))
    producer.flush()
    producer.close()
    size = sum(len(b) for _, b, _ in states[:n_sites])
    print(f"table recovery: {n_sites:,} site states ({size / 1e6:.1f} MB) in the changelog "
          f"({time.perf_counter() - t:.1f} s to produce); starting a fresh worker", flush=True)
    try:
        t0 = time.monotonic()
        w = fleet.start("w1")
        recovered = first = math.nan

        def progress() -> bool:
            nonlocal recovered, first
            m = w.metrics() or {}
            now = time.monotonic() - t0
            if math.isnan(recovered) and value(m, "dtwin_table_recoveries_total") >= 1:
                recovered = now
            if math.isnan(first) and sum(m.get("dtwin_commands_sent_total", {}).values()) >= 1:
                first = now
            return not math.isnan(recovered) and not math.isnan(first)

        wait_until(progress, args.timeout, 0.05, f"the worker to recover {n_sites} site states", w.alive)
    finally:
        fleet.close()
    cmd = [json.loads(r.value) for r in read_to_end(bootstrap, fleet.topics.commands)]
    policy = cmd[0]["policy"] if cmd else None
    print(f"table recovery: {n_sites:,} sites: recovered {recovered:.2f} s after start, first command "
          f"{first:.2f} s ({policy})", flush=True)
    return {"recovered_s": round(recovered, 3), "first_command_s": round(first, 3), "changelog_bytes": size,
            "first_command_policy": policy}


def cmd_bench_recovery(args: argparse.Namespace) -> int:
    import shutil

    from dtwin.kafka_broker import KafkaBroker

    if args.kills < 3:
        print("dtwin bench recovery: --kills must be at least 3 (a median and a max)", flush=True)
        return 2
    run_dir = Path(args.run_dir)
    model_dir = ensure_model(Path(args.model_dir) if args.model_dir else default_model_dir(args), args)
    data_dir = run_dir / "bench-recovery-kafka"
    shutil.rmtree(data_dir, ignore_errors=True)
    t0 = time.monotonic()
    with KafkaBroker(data_dir=data_dir, log_path=run_dir / "bench-recovery-kafka.log") as broker:
        print(f"Apache Kafka on {broker.bootstrap} (started in {broker.start_seconds:.1f} s)", flush=True)
        result = bench_takeover(args, broker.bootstrap, model_dir, run_dir)
        detail = {"0": bench_table_recovery(args, broker.bootstrap, model_dir, run_dir, 0)}
        for n in args.table_sites:
            detail[str(n)] = bench_table_recovery(args, broker.bootstrap, model_dir, run_dir, n)
    # Start → the first command for a pre-filled site: it needs the table restored (its policy says the window
    # was), whereas the recoveries counter only says Faust's recovery step ended.
    result["table_recovery_s"] = {str(n): detail[str(n)]["first_command_s"] for n in args.table_sites}
    result["table_recovery"] = detail
    result["settings"] = {"session_timeout_s": args.session_timeout,
                          "heartbeat_s": min(3.0, args.session_timeout / 3), "partitions": args.partitions,
                          "workers": 2, "sites": args.sites, "rate": args.rate, "warmup": args.warmup,
                          "model_dir": str(model_dir)}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=2))
    print(f"takeover over {result['kills']} kills: median {result['recovery_s']['median']:.1f} s, max "
          f"{result['recovery_s']['max']:.1f} s; lost {result['lost']}; duplicates {result['duplicates']} "
          f"(identical: {result['duplicates_identical']}); {result['takeover']['mismatched']} differ from the "
          "offline engine; table recovery "
          + ", ".join(f"{int(n):,} sites {s:.1f} s" for n, s in result["table_recovery_s"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ok = result["lost"] == 0 and result["duplicates_identical"] and result["takeover"]["mismatched"] == 0
    return 0 if ok else 1


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"site counts like 1000,10000,100000, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"site counts must be positive, got {text!r}")
    return sizes


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("recovery", help="takeover after kill -9 and table recovery time, on Apache Kafka")
    add_data_args(p)
    p.add_argument("--kills", type=int, default=3, help="workers killed one after another (default %(default)s)")
    p.add_argument("--sites", type=int, default=40, help="sites under continuous replay (default %(default)s)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the topics (default %(default)s)")
    p.add_argument("--rate", type=float, default=300.0, help="samples/s of the replay (default %(default)s)")
    p.add_argument("--session-timeout", type=float, default=10.0,
                   help="the workers' DTWIN_SESSION_TIMEOUT_SECONDS (default %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="baseline warm-up intervals (default %(default)s)")
    p.add_argument("--table-sites", type=_sizes, default=[1000, 10000, 100000],
                   help="site counts for the table recovery (default 1000,10000,100000)")
    p.add_argument("--model-dir", default=None, help="model artifact (default artifacts/<data>, trained if missing)")
    p.add_argument("--run-dir", default="runs", help="logs, worker state and the broker's log (default runs)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_bench_recovery)
