"""Fixtures with a real Apache Kafka broker (KRaft, one node, on disk). Loaded from tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dtwin.kafka_broker import KafkaBroker
from tests.brokers import start_kafka


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One broker for the whole session; tests share it, so each uses topics and groups of its own."""
    broker = start_kafka(tmp_path_factory.mktemp("kafka") / "data")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_fresh(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of the test's own, free to stop, kill and restart on its data dir."""
    broker = start_kafka(tmp_path / "kafka")
    try:
        yield broker
    finally:
        broker.kill()  # its data dir is thrown away: no need to wait for a clean shutdown
