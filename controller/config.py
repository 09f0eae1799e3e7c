"""Controller settings: environment variables with documented defaults (flags of ``dtwin controller``
set the same variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from contracts.topics import APP_ID, DEFAULT_PARTITIONS, DEFAULT_PREFIX


def _opt_float(v: str | None) -> float | None:
    return float(v) if v not in (None, "", "none") else None


@dataclass(frozen=True)
class ControllerConfig:
    bootstrap: str = "127.0.0.1:9092"  # DTWIN_BOOTSTRAP
    topic_prefix: str = DEFAULT_PREFIX  # DTWIN_TOPIC_PREFIX
    app_id: str = APP_ID  # DTWIN_APP_ID
    partitions: int = DEFAULT_PARTITIONS  # DTWIN_PARTITIONS
    model_dir: str = "artifacts/current"  # DTWIN_MODEL_DIR
    policy: str = "sla"  # DTWIN_POLICY: sla (forecast + calibrated headroom) or raw (the paper's)
    sla_target: float = 0.01  # DTWIN_SLA_TARGET
    capacity_floor: float = 0.0  # DTWIN_CAPACITY_FLOOR
    capacity_ceiling: float | None = None  # DTWIN_CAPACITY_CEILING
    metrics_port: int = 9108  # DTWIN_METRICS_PORT (0: no endpoint)
    web_port: int = 6066  # DTWIN_WEB_PORT (Faust's web server)
    batch_size: int = 1000  # DTWIN_BATCH_SIZE: most samples per batch
    batch_within_ms: float = 10.0  # DTWIN_BATCH_WITHIN_MS: longest wait to fill a batch
    session_timeout_seconds: float = 10.0  # DTWIN_SESSION_TIMEOUT_SECONDS: a lost worker's partitions move after this
    fetch_max_wait_ms: int = 20  # DTWIN_FETCH_MAX_WAIT_MS: longest broker-side wait of a fetch
    changelog_markers: bool = True  # DTWIN_CHANGELOG_MARKERS: work around Tansu's end offsets (0 to disable)
    gc_gen0_threshold: int = 50_000  # DTWIN_GC_GEN0_THRESHOLD: allocations between young-generation collections
    metrics_max_sites: int = 20  # DTWIN_METRICS_MAX_SITES: sites with their own label series
    model_poll_seconds: float = 5.0  # DTWIN_MODEL_POLL_SECONDS: how often to look for a new artifact
    state_dir: str = "runs/controller-state"  # DTWIN_STATE_DIR: Faust's data directory
    log_level: str = "warn"  # DTWIN_LOG_LEVEL: crit, error, warn, info or debug
    pipeline: str = "control"  # DTWIN_PIPELINE: control, or null (parse and forward, for benchmarks)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ControllerConfig:
        e = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            raw = e.get(f"DTWIN_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "capacity_ceiling":
                kwargs[f.name] = _opt_float(raw)
            elif f.type == "bool":
                kwargs[f.name] = raw.strip().lower() not in ("0", "false", "no", "off", "")
            elif f.type in ("int",):
                kwargs[f.name] = int(raw)
            elif f.type in ("float",):
                kwargs[f.name] = float(raw)
            else:
                kwargs[f.name] = raw
        cfg = cls(**kwargs)  # type: ignore[arg-type]
        if cfg.policy not in ("sla", "raw"):
            raise ValueError(f"DTWIN_POLICY must be sla or raw, got {cfg.policy!r}")
        if cfg.pipeline not in ("control", "null"):
            raise ValueError(f"DTWIN_PIPELINE must be control or null, got {cfg.pipeline!r}")
        return cfg
