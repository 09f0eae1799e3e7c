"""``dtwin replay``: stream KPI samples into Kafka at a chosen pace."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

from kafka.partitioner.default import murmur2
from tqdm import tqdm

from contracts.connection import KafkaSecurity
from contracts.messages import encode_sample
from forecaster.data import Site

DEFAULT_BASE_TS = 1_704_067_200  # 2024-01-01T00:00:00Z: day-aligned, so time of day is preserved


def site_partition(key: bytes, partitions: int) -> int:
    """The keyed partition every Kafka client agrees on (murmur2 of the key)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def parse_speed(text: str) -> float | None:
    """``real`` (one step per site every step_seconds), ``max`` (no pacing) or a factor like ``60``."""
    t = text.strip().lower()
    if t in ("max", "0", "inf"):
        return None
    if t == "real":
        return 1.0
    factor = float(t)
    if factor <= 0:
        raise ValueError(f"speed must be real, max or a positive factor, got {text!r}")
    return factor


@dataclass
class ReplayStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    seconds: float = 0.0


def replay(producer, topic: str, sites: list[Site], speed: float | None = None, start: int = 0,
           limit: int | None = None, loop: bool = False, base_ts: int = DEFAULT_BASE_TS, progress: bool = True,
           stop: threading.Event | None = None) -> ReplayStats:
    """Send samples interval by interval, all sites per interval, keyed by site.

    ``limit`` counts intervals (each is one sample per site). With ``loop`` the replay wraps
    to ``start`` and keeps timestamps increasing.
    """
    stop = stop or threading.Event()
    n_steps = min(len(s.values) for s in sites)
    if not 0 <= start < n_steps:
        raise ValueError(f"start offset {start} outside 0..{n_steps - 1}")
    step_seconds = sites[0].step_seconds
    period = None if speed is None else step_seconds / speed
    total = limit if limit is not None else (None if loop else n_steps - start)
    stats = ReplayStats()
    lock = threading.Lock()

    def on_ok(_):
        with lock:
            stats.acked += 1

    def on_err(_):
        with lock:
            stats.failed += 1

    keys = [s.name.encode() for s in sites]
    # Each site's partition once, by the clients' shared keyed rule (murmur2 of the key), rather
    # than hashing every record in Python: that was a large part of the producer's CPU.
    n_partitions = len(producer.partitions_for(topic))
    partitions = [site_partition(k, n_partitions) for k in keys]
    # Paced sends are spread evenly over each interval's period rather than sent as one burst.
    gap = None if period is None else period / len(sites)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="replay", unit="interval", disable=not progress)
    step = 0
    idx = start
    while (total is None or step < total) and not stop.is_set():
        if idx >= n_steps:
            if not loop:
                break
            idx = start
        # Recorded time offset of this interval; past a loop's wrap it keeps increasing.
        ts = base_ts + int(sites[0].timestamps[0]) + step_seconds * (start + step)
        for k, (site, key, partition) in enumerate(zip(sites, keys, partitions, strict=True)):
            if gap is not None:
                delay = t0 + (step * len(sites) + k) * gap - time.perf_counter()
                if delay > 0.001:
                    stop.wait(delay)
            fut = producer.send(topic, key=key, value=encode_sample(site.name, ts, site.values[idx]),
                                partition=partition)
            fut.add_callback(on_ok)
            fut.add_errback(on_err)
            stats.sent += 1
        step += 1
        idx += 1
        bar.update(1)
    producer.flush()
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def producer_options(bootstrap: str, security: KafkaSecurity | None = None) -> dict:
    """The replay producer's settings. Idempotence with unbounded retries (within the 120 s delivery
    timeout) lets it ride out a broker restart without losing or duplicating a sample."""
    sec = security or KafkaSecurity.from_env()
    return {"bootstrap_servers": bootstrap, "acks": "all", "linger_ms": 5, "batch_size": 256 * 1024,
            "client_id": "dtwin-replay", "enable_idempotence": True, "retries": 2**31 - 1,
            "delivery_timeout_ms": 120_000, "reconnect_backoff_max_ms": 1000, **sec.kafka_python_options()}


def make_producer(bootstrap: str, security: KafkaSecurity | None = None, **overrides):
    from kafka import KafkaProducer

    return KafkaProducer(**{**producer_options(bootstrap, security), **overrides})


def install_sigint(stop: threading.Event) -> None:
    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
