"""Topic and table names."""

from __future__ import annotations

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
