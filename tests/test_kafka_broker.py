"""The real Apache Kafka broker the project starts (dtwin.kafka_broker): settings, clients, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dtwin.broker import BrokerError, EmbeddedBroker, make_broker
from dtwin.kafka_broker import BROKER_SETTINGS, TOPOLOGY_SETTINGS, KafkaBroker, kafka_version, server_properties
from replay.producer import make_producer
from tests.brokers import consume_group, kcat_read, produce
from tests.kafka_util import read_topic

REPO_ROOT = Path(__file__).resolve().parents[1]


def records(prefix: str, n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(f"site-{i % 7}".encode(), f"{prefix}-{i}".encode()) for i in range(start, start + n)]


def test_compose_kafka_service_has_the_local_brokers_settings() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    env = compose["services"]["kafka"]["environment"]
    compose_props = {k.removeprefix("KAFKA_").lower().replace("_", "."): str(v)
                     for k, v in env.items() if k.startswith("KAFKA_")}
    unknown = set(compose_props) - set(BROKER_SETTINGS) - TOPOLOGY_SETTINGS
    assert not unknown, f"docker-compose.yml sets {sorted(unknown)}: add them to dtwin.kafka_broker.BROKER_SETTINGS"
    shared = {k: compose_props.get(k) for k in BROKER_SETTINGS}
    assert shared == BROKER_SETTINGS, "docker-compose.yml's kafka service and BROKER_SETTINGS disagree"
    local = server_properties(9092, 9093, Path("/data"))
    assert set(local) >= TOPOLOGY_SETTINGS, "every compose-only setting must have a local counterpart"
    assert {k: local[k] for k in BROKER_SETTINGS} == BROKER_SETTINGS


def test_pom_resolves_kafka_4() -> None:
    assert kafka_version().split(".")[0] == "4"


@pytest.mark.kafka
def test_round_trip_with_kafka_python(kafka: KafkaBroker) -> None:
    topic = "rt.roundtrip"
    sent = records("rt", 200)
    produce(kafka.bootstrap, topic, sent)
    got = read_topic(kafka.bootstrap, topic, len(sent))
    assert sorted((r.key, r.value) for r in got) == sorted(sent)
    # auto-created with the broker's num.partitions, as in docker-compose.yml
    assert len({r.partition for r in got}) == int(BROKER_SETTINGS["num.partitions"])


@pytest.mark.kafka
def test_kcat_reads_what_kafka_python_wrote(kafka: KafkaBroker) -> None:
    topic = "rt.kcat"
    sent = records("kcat", 50)
    produce(kafka.bootstrap, topic, sent)
    got = kcat_read(kafka.bootstrap, topic)
    assert sorted(got) == sorted((k.decode(), v.decode()) for k, v in sent)


@pytest.mark.kafka
def test_stop_start_and_crash_keep_records_and_committed_offsets(kafka_fresh: KafkaBroker) -> None:
    broker, topic, group = kafka_fresh, "rt.durable", "rt-durable"
    first, second, third = records("a", 50), records("b", 10, 50), records("c", 5, 60)
    produce(broker.bootstrap, topic, first)
    assert sorted(consume_group(broker.bootstrap, topic, group, len(first))) == sorted(first)
    produce(broker.bootstrap, topic, second)

    broker.stop()
    broker.start()
    assert sorted((r.key, r.value) for r in read_topic(broker.bootstrap, topic, 60)) == sorted(first + second)
    # the committed offsets survived: the group resumes after `first`
    assert sorted(consume_group(broker.bootstrap, topic, group, len(second))) == sorted(second)

    # acks=all records and commits survive a SIGKILL too (they are in the page cache, which the process loses not)
    produce(broker.bootstrap, topic, third)
    broker.kill()
    broker.start()
    assert sorted(consume_group(broker.bootstrap, topic, group, len(third))) == sorted(third)


@pytest.mark.kafka
def test_replay_producer_survives_a_broker_restart_mid_stream(kafka_fresh: KafkaBroker) -> None:
    """replay.producer.make_producer's producer, sending while the broker stops and comes back on the same
    data dir and port: every record is acked, and lands exactly once."""
    broker, topic = kafka_fresh, "rt.restart"
    producer = make_producer(broker.bootstrap)
    acked: list[bytes] = []
    failed: list[Exception] = []

    def send(value: bytes) -> None:
        fut = producer.send(topic, key=value[-1:], value=value)
        fut.add_callback(lambda _metadata: acked.append(value))  # list.append: atomic, no lock needed
        fut.add_errback(failed.append)

    try:
        n = 0
        for _ in range(100):
            send(f"before-{n}".encode())
            n += 1
        producer.flush(30)
        restarter = threading.Thread(target=broker.restart)
        restarter.start()
        while restarter.is_alive():  # records sent while the broker is going down, down and coming back
            send(f"during-{n}".encode())
            n += 1
            time.sleep(0.01)
        restarter.join()
        for _ in range(100):
            send(f"after-{n}".encode())
            n += 1
        producer.flush(120)
    finally:
        producer.close(10)
    assert not failed, f"{len(failed)} of {n} sends failed, first: {failed[0]!r}"
    assert len(acked) == n
    values = [r.value for r in read_topic(broker.bootstrap, topic, n)]
    assert len(values) == n, f"{len(values) - len(set(values))} duplicates" if len(values) > n else "records lost"
    assert sorted(values) == sorted(acked)


def test_make_broker_kinds(tmp_path: Path) -> None:
    assert isinstance(make_broker("tansu"), EmbeddedBroker)
    kafka = make_broker("kafka", port=19092, data_dir=tmp_path)
    assert isinstance(kafka, KafkaBroker) and kafka.bootstrap == "127.0.0.1:19092" and kafka.data_dir == tmp_path
    with pytest.raises(BrokerError, match="in memory"):
        make_broker("tansu", data_dir=tmp_path)
    with pytest.raises(BrokerError, match="unknown broker kind"):
        make_broker("zookeeper")


@pytest.mark.kafka
def test_run_broker_cli_serves_until_sigterm_then_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "cli"
    code = ("from dtwin.kafka_broker import run_broker_cli; "
            f"raise SystemExit(run_broker_cli('kafka', None, {str(data)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("bootstrap 127.0.0.1:"), first
        assert proc.stdout.readline().strip() == f"data dir {data}"
        produce(first.split()[1], "rt.cli", records("cli", 3))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (data / "meta.properties").is_file()
    assert "Kafka Server started" in (data / "dtwin-broker.log").read_text(encoding="utf-8")
