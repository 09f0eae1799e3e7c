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
import hashlib
import json
import math
from dataclasses import dataclass

from forecaster import KPI_NAMES

SAMPLE_SCHEMA = "dtwin.kpi-sample/1"
COMMAND_SCHEMA = "dtwin.allocation-command/1"
DEAD_LETTER_SCHEMA = "dtwin.dead-letter/1"
SAMPLE_FIELDS = ("site", "ts", *KPI_NAMES)

# Reasons a sample is rejected; each is a label value of dtwin_samples_rejected_total.
REJECT_REASONS = ("tombstone", "payload_too_large", "malformed_json", "not_an_object", "missing_field",
                  "unknown_field", "unsupported_schema", "wrong_type", "not_finite", "negative_value", "out_of_range",
                  "bad_timestamp", "missing_key", "bad_key", "key_mismatch", "duplicate", "out_of_order", "misaligned",
                  "too_far_ahead")
# KPI values are in the dataset's normalized units; the bound keeps every allocation and metric finite.
VALUE_MAX = 1000.0
# Epoch seconds up to the end of year 9999: a whole, finite, 64-bit timestamp.
TS_MAX = 253_402_300_799
# Larger records are not parsed; their dead letters carry only the first bytes.
MAX_SAMPLE_BYTES = 64 * 1024
DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024


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


def parse_sample(raw: bytes | str | None) -> Sample:
    """Validate one raw message; raise :class:`Rejected` with a reason and detail."""
    if raw is None:
        raise Rejected("tombstone", "the record has no value (a tombstone); a sample is a JSON object")
    if len(raw) > MAX_SAMPLE_BYTES:
        raise Rejected("payload_too_large", f"{len(raw)} bytes, at most {MAX_SAMPLE_BYTES}")
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
    if ts != int(ts) or not 0 <= ts <= TS_MAX:
        raise Rejected("bad_timestamp", f"ts must be whole epoch seconds in 0..{TS_MAX}, got {body['ts']!r}")
    values = tuple(_number(body, k) for k in KPI_NAMES)
    for k, v in zip(KPI_NAMES, values, strict=True):
        if v < 0:
            raise Rejected("negative_value", f"{k} is {v}")
        if v > VALUE_MAX:
            raise Rejected("out_of_range", f"{k} is {v}, above {VALUE_MAX:g} (values are in normalized units "
                                           f"0..{VALUE_MAX:g})")
    return Sample(site=site, ts=int(ts), values=values)  # type: ignore[arg-type]


def check_key(key: bytes | None, site: str) -> None:
    """The record key must be the sample's site: it places the site's state and its commands."""
    if key is None:
        raise Rejected("missing_key", f"the record has no key; it must be the site {site!r}")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_key", f"record key {key[:64]!r} is not UTF-8; it must be the site {site!r}") from None
    if text != site:
        raise Rejected("key_mismatch", f"record key {text[:64]!r} is not the site {site!r}")


def encode_command(site: str, ts: int, allocated: float, forecast: float, policy: str, model_version: str,
                   decided_at: float) -> bytes:
    return json.dumps({
        "schema": COMMAND_SCHEMA, "site": site, "ts": int(ts), "allocated": float(allocated),
        "forecast": float(forecast), "policy": policy, "model_version": model_version,
        "decided_at": round(decided_at, 6),
    }, separators=(",", ":")).encode()


def encode_dead_letter(payload: bytes | None, reason: str, detail: str, topic: str, partition: int, offset: int,
                       key: bytes | None, rejected_at: float) -> bytes:
    """The rejected record with its reason; a payload beyond ``DEAD_LETTER_PAYLOAD_BYTES`` is cut (its size
    and sha256 say what it was), so the dead letter itself always fits the broker's record limit."""
    raw = payload or b""
    kept = raw[:DEAD_LETTER_PAYLOAD_BYTES]
    try:
        text, b64 = kept.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(kept).decode()
    key_text = None if key is None else key[:1024].decode("utf-8", "replace")
    return json.dumps({
        "schema": DEAD_LETTER_SCHEMA, "reason": reason, "detail": detail[:2000], "payload": text,
        "payload_base64": b64, "payload_bytes": len(raw), "payload_truncated": len(kept) < len(raw),
        "payload_sha256": hashlib.sha256(raw).hexdigest(), "tombstone": payload is None, "key": key_text,
        "source": {"topic": topic, "partition": partition, "offset": offset}, "rejected_at": round(rejected_at, 6),
    }, separators=(",", ":")).encode()
