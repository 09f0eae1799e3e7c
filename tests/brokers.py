"""Helpers for the tests on a real Apache Kafka broker (dtwin.kafka_broker.KafkaBroker)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from dtwin.broker import BrokerError
from dtwin.kafka_broker import KafkaBroker

HINT = ("run `make tools` (installs Java, Maven and kcat, and fetches Kafka's jars into .kafka/lib), "
        "or point DTWIN_KAFKA_LIB at a folder of Kafka's jars")


def start_kafka(data_dir: Path, timeout: float = 90.0) -> KafkaBroker:
    """A started broker on data_dir; the test fails (never skips) when Kafka cannot be started."""
    broker = KafkaBroker(data_dir=data_dir)
    try:
        return broker.start(timeout)
    except BrokerError as e:
        pytest.fail(f"Apache Kafka could not be started: {e}; {HINT}", pytrace=False)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]], **config: object) -> int:
    """Send keyed records with acks=all and wait for every ack; returns how many were sent."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, **{"acks": "all", **config})
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(60)
        for f in futures:
            f.get(timeout=0)
        return len(futures)
    finally:
        producer.close(10)


def consume_group(bootstrap: str, topic: str, group: str, expected: int, timeout: float = 60.0,
                  quiet: float = 1.0) -> list[tuple[bytes, bytes]]:
    """Read as consumer group ``group`` until ``expected`` records came and then ``quiet`` s passed with no more
    (so extra records show), commit the positions synchronously and leave the group."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        got: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for recs in batch.values():
                got.extend((r.key, r.value) for r in recs)
                last_new = time.monotonic()
            if len(got) >= expected and time.monotonic() - last_new >= quiet:
                break
        consumer.commit()
        return got
    finally:
        consumer.close()


def kcat_binary() -> str:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.fail(f"kcat is not installed (Debian package `kcat`); {HINT}", pytrace=False)
    return kcat


def kcat_read(bootstrap: str, topic: str, timeout: float = 60.0) -> list[tuple[str, str]]:
    """Every record of ``topic`` from the beginning, read by kcat, as (key, value) strings."""
    proc = subprocess.run([kcat_binary(), "-b", bootstrap, "-C", "-t", topic, "-e", "-o", "beginning", "-q",
                           "-f", r"%k\t%s\n"], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"kcat exited with {proc.returncode}: {proc.stderr.strip()}"
    return [tuple(line.split("\t", 1)) for line in proc.stdout.splitlines() if line]  # type: ignore[misc]
