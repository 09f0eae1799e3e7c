"""Topic names and their creation up front (a Faust worker whose source topic is missing hangs
while joining its group)."""

from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_PREFIX = "dtwin."
DEFAULT_PARTITIONS = 4
APP_ID = "dtwin-controller"
WINDOW_TABLE = "site-windows"


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    @property
    def samples(self) -> str:
        return f"{self.prefix}kpi-samples"

    @property
    def commands(self) -> str:
        return f"{self.prefix}allocation-commands"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    def changelog(self, app_id: str = APP_ID) -> str:
        return f"{app_id}-{WINDOW_TABLE}-changelog"

    def all(self, app_id: str = APP_ID) -> list[str]:
        return [self.samples, self.commands, self.dead_letter, self.changelog(app_id)]


def create_topics(bootstrap: str, topics: Topics, partitions: int = DEFAULT_PARTITIONS, app_id: str = APP_ID,
                  timeout: float = 30.0) -> list[str]:
    """Create any missing topic with ``partitions`` partitions; return the names created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="dtwin-topics")
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics.all(app_id) if t not in existing]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
