"""Message contracts (JSON, versioned by their ``schema`` field). See docs/contracts.md.

* KPI sample ``dtwin.kpi-sample/1``: site, ts (epoch seconds of the interval), internet,
  sessions, vpn, downstream. ``schema`` is optional on input; any other field is rejected.
* Allocation command ``dtwin.allocation-command/1``: site, ts of the interval it provisions,
  allocated, forecast, policy, model_version, decided_at.
* Dead-letter record ``dtwin.dead-letter/1``: the raw payload, the reason, and the source
  topic/partition/offset.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass

from forecaster import KPI_NAMES

SAMPLE_SCHEMA = "dtwin.kpi-sample/1"
COMMAND_SCHEMA = "dtwin.allocation-command/1"
DEAD_LETTER_SCHEMA = "dtwin.dead-letter/1"
SAMPLE_FIELDS = ("site", "ts", *KPI_NAMES)

# Reasons a sample is rejected; each is a label value of dtwin_samples_rejected_total.
REJECT_REASONS = ("malformed_json", "not_an_object", "missing_field", "unknown_field", "unsupported_schema",
                  "wrong_type", "not_finite", "negative_value", "bad_timestamp", "key_mismatch", "duplicate",
                  "out_of_order", "misaligned")


@dataclass(frozen=True)
class Sample:
    site: str
    ts: int
    values: tuple[float, float, float, float]  # KPI_NAMES order

    def to_json(self) -> bytes:
        return encode_sample(self.site, self.ts, self.values)


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_sample(site: str, ts: int, values) -> bytes:
    body = {"schema": SAMPLE_SCHEMA, "site": site, "ts": int(ts)}
    body.update({k: round(float(v), 6) for k, v in zip(KPI_NAMES, values, strict=True)})
    return json.dumps(body, separators=(",", ":")).encode()


def _number(body: dict, name: str) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Rejected("wrong_type", f"{name} must be a number, got {type(v).__name__} {v!r}")
    try:
        v = float(v)
    except OverflowError:  # an integer literal beyond the float range
        raise Rejected("not_finite", f"{name} is out of the floating-point range") from None
    if not math.isfinite(v):
        raise Rejected("not_finite", f"{name} is {v}")
    return v


def parse_sample(raw: bytes | str) -> Sample:
    """Validate one raw message; raise :class:`Rejected` with a reason and detail."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed_json", str(exc)) from None
    except ValueError as exc:  # e.g. NaN constants are JSON extensions Python accepts
        raise Rejected("malformed_json", str(exc)) from None
    except RecursionError:  # deeply nested arrays/objects
        raise Rejected("malformed_json", "nested too deeply") from None
    if not isinstance(body, dict):
        raise Rejected("not_an_object", f"expected a JSON object, got {type(body).__name__}")
    schema = body.pop("schema", SAMPLE_SCHEMA)
    if schema != SAMPLE_SCHEMA:
        raise Rejected("unsupported_schema", f"schema {schema!r}, expected {SAMPLE_SCHEMA!r}")
    missing = [f for f in SAMPLE_FIELDS if f not in body]
    if missing:
        raise Rejected("missing_field", f"missing {', '.join(missing)}")
    unknown = sorted(set(body) - set(SAMPLE_FIELDS))
    if unknown:
        raise Rejected("unknown_field", f"unknown {', '.join(unknown)}")
    site = body["site"]
    if not isinstance(site, str) or not site:
        raise Rejected("wrong_type", f"site must be a non-empty string, got {site!r}")
    try:
        site.encode("utf-8")  # the site is the record key and the table key
    except UnicodeEncodeError:
        raise Rejected("wrong_type", f"site must be valid Unicode text, got {site!r}") from None
    ts = _number(body, "ts")
    if ts != int(ts) or ts < 0:
        raise Rejected("bad_timestamp", f"ts must be whole, non-negative epoch seconds, got {body['ts']!r}")
    values = tuple(_number(body, k) for k in KPI_NAMES)
    for k, v in zip(KPI_NAMES, values, strict=True):
        if v < 0:
            raise Rejected("negative_value", f"{k} is {v}")
    return Sample(site=site, ts=int(ts), values=values)  # type: ignore[arg-type]


def encode_command(site: str, ts: int, allocated: float, forecast: float, policy: str, model_version: str,
                   decided_at: float) -> bytes:
    return json.dumps({
        "schema": COMMAND_SCHEMA, "site": site, "ts": int(ts), "allocated": float(allocated),
        "forecast": float(forecast), "policy": policy, "model_version": model_version,
        "decided_at": round(decided_at, 6),
    }, separators=(",", ":")).encode()


def encode_dead_letter(payload: bytes | None, reason: str, detail: str, topic: str, partition: int, offset: int,
                       key: bytes | None, rejected_at: float) -> bytes:
    raw = payload or b""
    try:
        text, b64 = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(raw).decode()
    return json.dumps({
        "schema": DEAD_LETTER_SCHEMA, "reason": reason, "detail": detail, "payload": text, "payload_base64": b64,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "source": {"topic": topic, "partition": partition, "offset": offset}, "rejected_at": round(rejected_at, 6),
    }, separators=(",", ":")).encode()
