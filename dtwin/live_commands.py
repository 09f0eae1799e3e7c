"""Kafka-side subcommands (filled in with the live loop)."""

from __future__ import annotations


def register(sub, bench, **_: object) -> None:
    return None
