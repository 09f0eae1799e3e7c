"""Controller settings: ``DTWIN_*`` environment variables with documented defaults, validated by
pydantic-settings (flags of ``dtwin controller`` set the same variables). Chosen over a hand-rolled
parser for its type coercion, validation errors that name the variable, and secret handling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.connection import KafkaSecurity
from contracts.topics import APP_ID, DEFAULT_PARTITIONS, DEFAULT_PREFIX


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DTWIN_", extra="ignore", frozen=True, env_ignore_empty=True,
                                      env_parse_none_str="none")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap host:port")
    topic_prefix: str = Field(DEFAULT_PREFIX, description="topic name prefix")
    app_id: str = Field(APP_ID, description="consumer group and changelog topic prefix")
    partitions: int = Field(DEFAULT_PARTITIONS, ge=1, description="partitions of the samples topic and table")
    model_dir: str = Field("artifacts/current", description="a plain artifact folder (model.onnx + manifest.json)")
    model_registry: str | None = Field(None, description="a model registry folder; its current/candidate pointers "
                                                         "are served instead of model_dir")
    model_poll_seconds: float = Field(0.5, gt=0, description="how often the model pointers are checked")
    policy: Literal["sla", "raw"] = Field("sla", description="sla: forecast + online headroom; raw: the paper's")
    sla_target: float = Field(0.01, gt=0, lt=1, description="target share of under-provisioned intervals")
    capacity_floor: float = Field(0.0, ge=0, description="lowest allocation")
    capacity_ceiling: float | None = Field(None, description="highest allocation (none: unbounded)")
    baseline_warmup_intervals: int = Field(2016, ge=1, le=65535,
                                           description="intervals of a site that fix its B1/B2 levels "
                                                       "(2016 = one week); nothing is scored before")
    future_horizon_intervals: int = Field(2016, ge=1, description="a sample further ahead of its site's last is "
                                                                 "dead-lettered unless the next one continues it")
    metrics_port: int = Field(9108, ge=0, description="Prometheus port (0: no endpoint)")
    metrics_bind: str = Field("0.0.0.0", description="address the metrics endpoint listens on")
    web_port: int = Field(6066, ge=1, description="Faust's web server port")
    batch_size: int = Field(1000, ge=1, description="most samples per batch")
    batch_within_ms: float = Field(10.0, gt=0, description="longest wait to fill a batch")
    delivery_attempts: int = Field(6, ge=1, description="tries to deliver a batch before the worker stops")
    session_timeout_seconds: float = Field(10.0, gt=0, description="a lost worker's partitions move after this")
    fetch_max_wait_ms: int = Field(20, ge=1, description="longest broker-side wait of a fetch")
    changelog_markers: bool = Field(True, description="work around Tansu's end offsets; off (0) on Apache Kafka")
    gc_gen0_threshold: int = Field(50_000, ge=700, description="allocations between young-generation collections")
    metrics_max_sites: int = Field(20, ge=0, description="sites with their own label series")
    state_dir: str = Field("runs/controller-state", description="Faust's data directory (one per worker)")
    log_level: Literal["crit", "error", "warn", "info", "debug"] = Field("warn", description="worker log level")
    pipeline: Literal["control", "null"] = Field("control", description="null: parse and forward, for benchmarks")
    fault_point: str | None = Field(None, description="testing only: crash the worker at this step of the N-th "
                                                      "batch, as STEP:N (after_commands, after_state, mid_send)")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    def security(self) -> KafkaSecurity:
        return KafkaSecurity(
            security_protocol=self.kafka_security_protocol.upper(), sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            ssl_cafile=self.kafka_ssl_cafile, ssl_certfile=self.kafka_ssl_certfile, ssl_keyfile=self.kafka_ssl_keyfile)
