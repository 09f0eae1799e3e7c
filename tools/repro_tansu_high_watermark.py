"""Minimal reproduction: after a produce request carrying a batch of N records, Tansu reports the
partition's end offset (high watermark) as the batch's base offset + 1, not its last offset + 1.

Anything that reads "up to the end offset" then misses the batch's other records. Faust's table
recovery does exactly that, so a restarted worker restores stale values for the keys written last.
controller.app works around it (DTWIN_CHANGELOG_MARKERS): after each batch's changelog records are
stored it writes one marker record on its own to each changelog partition it touched, so the
reported end offset lies past every state record.

Run: python tools/repro_tansu_high_watermark.py
"""

from __future__ import annotations

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from contracts.topics import Topics
from dtwin.broker import EmbeddedBroker
from dtwin.topics import create_topics


def main() -> None:
    with EmbeddedBroker() as broker:
        topics = Topics("repro.")
        create_topics(broker.bootstrap, topics, partitions=1, app_id="repro")
        tp = TopicPartition(topics.samples, 0)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=50)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        for i in range(3):
            producer.send(tp.topic, key=b"k", value=b"batched-%d" % i)
        producer.flush()
        print(f"3 records in one batch:      end offset {consumer.end_offsets([tp])[tp]} (Kafka: 3)")
        for i in range(3):
            producer.send(tp.topic, key=b"k", value=b"single-%d" % i).get()
        print(f"then 3 records one by one:   end offset {consumer.end_offsets([tp])[tp]} (Kafka: 6)")
        for i in range(3):
            producer.send(tp.topic, key=b"k", value=b"batched-%d" % i)
        producer.flush()
        print(f"then 3 more in one batch:    end offset {consumer.end_offsets([tp])[tp]} (Kafka: 9)")
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        offsets = []
        for _ in range(5):
            for records in consumer.poll(timeout_ms=300).values():
                offsets.extend(r.offset for r in records)
        print(f"records actually stored at offsets {offsets}")
        producer.close()
        consumer.close()


if __name__ == "__main__":
    main()
