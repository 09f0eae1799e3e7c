"""How every client (replay, topic admin, controller workers) connects to Kafka: SASL/TLS options from
``DTWIN_KAFKA_*`` environment variables, in one place so they reach every client alike."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = "PLAINTEXT"  # DTWIN_KAFKA_SECURITY_PROTOCOL
    sasl_mechanism: str | None = None  # DTWIN_KAFKA_SASL_MECHANISM
    sasl_username: str | None = None  # DTWIN_KAFKA_SASL_USERNAME
    sasl_password: str | None = None  # DTWIN_KAFKA_SASL_PASSWORD (never logged)
    ssl_cafile: str | None = None  # DTWIN_KAFKA_SSL_CAFILE
    ssl_certfile: str | None = None  # DTWIN_KAFKA_SSL_CERTFILE
    ssl_keyfile: str | None = None  # DTWIN_KAFKA_SSL_KEYFILE

    def __post_init__(self) -> None:
        if self.security_protocol not in PROTOCOLS:
            raise ValueError(f"DTWIN_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, "
                             f"got {self.security_protocol!r}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"DTWIN_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)} with "
                                 f"{self.security_protocol}, got {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("SASL needs DTWIN_KAFKA_SASL_USERNAME and DTWIN_KAFKA_SASL_PASSWORD")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
        e = os.environ if environ is None else environ
        values = {f.name: e.get(f"DTWIN_KAFKA_{f.name.upper()}") or None for f in fields(cls)}
        values["security_protocol"] = (values["security_protocol"] or "PLAINTEXT").upper()
        return cls(**values)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if shown["sasl_password"] is not None:
            shown["sasl_password"] = "***"
        return "KafkaSecurity(" + ", ".join(f"{k}={v!r}" for k, v in shown.items() if v is not None) + ")"

    __str__ = __repr__

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def kafka_python_options(self) -> dict[str, object]:
        """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        opts: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        if self.uses_ssl:
            opts.update({k: v for k, v in (("ssl_cafile", self.ssl_cafile), ("ssl_certfile", self.ssl_certfile),
                                           ("ssl_keyfile", self.ssl_keyfile)) if v})
        return opts
