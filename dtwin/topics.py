"""Topic creation up front: a Faust worker whose source topic is missing hangs while joining its group."""

from __future__ import annotations

import time

from contracts.connection import KafkaSecurity
from contracts.topics import APP_ID, DEFAULT_PARTITIONS, Topics

# A site's state record replaces the one before: the changelog keeps the latest per key.
CHANGELOG_CONFIG = {"cleanup.policy": "compact"}


def create_topics(bootstrap: str, topics: Topics, partitions: int = DEFAULT_PARTITIONS, app_id: str = APP_ID,
                  timeout: float = 30.0, client_options: dict | None = None) -> list[str]:
    """Create any missing topic with ``partitions`` partitions (the changelog compacted); return those created.

    ``client_options`` default to the SASL/TLS settings of the ``DTWIN_KAFKA_*`` variables."""
    if client_options is None:
        client_options = KafkaSecurity.from_env().kafka_python_options()
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="dtwin-topics", **client_options)
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        changelog = topics.changelog(app_id)
        created = []
        for name in topics.all(app_id):
            if name in existing:
                continue
            configs = CHANGELOG_CONFIG if name == changelog else {}
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                              topic_configs=configs)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
