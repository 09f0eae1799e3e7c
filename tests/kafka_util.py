"""Helpers for the tests that run against the embedded broker."""

from __future__ import annotations

import time

WAIT = 240.0  # seconds: a fresh Faust worker's first group join alone takes 30-40 s on Tansu


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    """All records of a topic, read by partition assignment (no consumer group)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=2000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
            ends = consumer.end_offsets(parts)
            if len(records) >= expected and all(consumer.position(p) >= ends[p] for p in parts):
                break
        return records
    finally:
        consumer.close()
