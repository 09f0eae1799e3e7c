"""Minimal reproduction: under a steady stream of records, Tansu answers a consumer's fetch late,
so records wait on the broker for a large share of the consumer's fetch_max_wait_ms.

A Kafka broker answers a pending fetch as soon as fetch_min_bytes (1 by default) are available,
so the wait setting should not show up in latency while records flow. Faust hard-codes
fetch_max_wait_ms=1500 for its worker consumer: on Tansu that is ~0.4 s median and ~0.75 s p99
of added latency. controller.app lowers it (DTWIN_FETCH_MAX_WAIT_MS, default 20).

Run: python tools/repro_tansu_fetch_wait.py   (prints median and p99 produce→consume latency)
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts.topics import Topics
from dtwin.broker import EmbeddedBroker
from dtwin.topics import create_topics


async def latencies(bootstrap: str, topic: str, fetch_max_wait_ms: int, n: int = 500,
                    gap_s: float = 0.002) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, fetch_max_wait_ms=fetch_max_wait_ms,
                                auto_offset_reset="latest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    await asyncio.sleep(1.0)
    seen: list[float] = []

    async def consume() -> None:
        while len(seen) < n:
            batches = await consumer.getmany(timeout_ms=2000)
            now = time.time()
            for records in batches.values():
                seen.extend((now - float(r.value.decode())) * 1e3 for r in records)

    task = asyncio.create_task(consume())
    for _ in range(n):
        await producer.send(topic, str(time.time()).encode())
        await asyncio.sleep(gap_s)
    await asyncio.wait_for(task, 30)
    await consumer.stop()
    await producer.stop()
    seen.sort()
    return seen[len(seen) // 2], seen[int(len(seen) * 0.99)]


def main() -> None:
    with EmbeddedBroker() as broker:
        topics = Topics("repro.")
        create_topics(broker.bootstrap, topics, partitions=1, app_id="repro")
        for wait_ms in (1500, 500, 100, 20):
            p50, p99 = asyncio.run(latencies(broker.bootstrap, topics.samples, wait_ms))
            print(f"fetch_max_wait_ms={wait_ms:5d}: produce→consume latency p50 {p50:7.1f} ms, p99 {p99:7.1f} ms")


if __name__ == "__main__":
    main()
